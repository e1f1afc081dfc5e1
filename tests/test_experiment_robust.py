"""The robust-mitigation report's trade-off verdict follows the measured figures, not a fixed sentence."""

from analysis.experiments.robust_mitigation import HELD_OUT_UNAFFECTED, TARGET_DORI_REPLICATION, VARIANTS, variant_lines


def summary(dori: dict[str, float], similarity: dict[str, float]) -> dict:
    names = ("none", "finetune", "control", "control_ema", *VARIANTS)
    return {name: dict(dori_replication=dori.get(name, 1.0), held_out_similarity=similarity.get(name, 0.8),
                       held_out_loss=0.03) for name in names}


def test_the_verdict_names_the_best_setting_of_each_side_of_the_trade_off():
    text = "\n".join(variant_lines(summary(dict(finetune=0.19, distilled=0.19), dict(distilled=0.86))))
    assert "closest is adversarial fine-tuning, distilled normal term (similarity 0.860)" in text
    assert "No setting meets both targets" in text


def test_a_setting_that_meets_both_targets_is_named():
    good = VARIANTS[0]
    text = "\n".join(variant_lines(summary({good: TARGET_DORI_REPLICATION}, {good: HELD_OUT_UNAFFECTED})))
    assert "meet(s) both targets" in text and "No setting meets both targets" not in text


def test_no_verdict_without_every_variant_measured():
    partial = summary({}, {})
    del partial[VARIANTS[-1]]
    assert variant_lines(partial) == []
