"""The robust-mitigation report's verdicts follow the measured figures, not fixed sentences."""

from analysis.experiments.robust_mitigation_report import (FIDELITY_UNAFFECTED, HELD_OUT_UNAFFECTED,
                                                           TARGET_DORI_REPLICATION, VARIANTS, variant_lines)


def summary(dori: dict[str, float], similarity: dict[str, float], fidelity: dict[str, float]) -> dict:
    names = ("none", "finetune", "control", "control_ema", *VARIANTS)
    return {name: dict(dori_replication=dori.get(name, 1.0), held_out_similarity=similarity.get(name, 0.8),
                       held_out_loss=0.03, held_out_fidelity=fidelity.get(name, 0.8), dori_by_start=[0.0, 1.0])
            for name in names}


def report(*figures) -> str:
    return "\n".join(variant_lines(summary(*figures)))


def test_the_trade_off_names_the_setting_that_keeps_held_out_captions_closest():
    text = report(dict(finetune=0.19, distilled=0.19), dict(distilled=0.86), {})
    assert "closest is adversarial fine-tuning, distilled normal term (similarity 0.860)" in text
    assert ("adversarial fine-tuning, adversarial fine-tuning, distilled normal term unlearn(s) the image and keep(s) "
            "held-out captions drawn as captioned") in text


def test_a_setting_that_meets_every_target_is_named():
    good = VARIANTS[0]
    text = report({good: TARGET_DORI_REPLICATION}, {good: HELD_OUT_UNAFFECTED}, {good: 0.8 - FIDELITY_UNAFFECTED / 2})
    assert "adversarial fine-tuning, distilled normal term meet(s) every target" in text


def test_unlearning_that_costs_caption_fidelity_meets_no_target():
    text = report(dict(finetune=0.19), dict(finetune=0.95), dict(finetune=0.8 - 2 * FIDELITY_UNAFFECTED))
    assert "No setting unlearns the image and keeps held-out captions drawn as captioned" in text


def test_no_verdict_without_every_variant_measured():
    partial = summary({}, {}, {})
    del partial[VARIANTS[-1]]
    assert variant_lines(partial) == []


def test_caption_only_triggers_are_compared_start_by_start():
    figures = summary({}, {}, {})
    figures["finetune"]["dori_by_start"] = [0.0, 0.375]
    text = "\n".join(variant_lines(figures))
    assert "0.00, 1.00, against 0.00, 0.38 with Gaussian-start triggers" in text
    assert "leaves the image for a search from elsewhere" in text
    figures["caption_triggers"]["dori_by_start"] = [0.0, 0.25]
    assert "leaves the image for a search from elsewhere" not in "\n".join(variant_lines(figures))


def test_more_normal_rows_are_judged_against_the_distilled_term():
    worse = report({}, dict(distilled=0.80, distilled_wide=0.70), dict(distilled=0.68, distilled_wide=0.64))
    assert "did not hold the held-out captions closer" in worse
    mixed = report({}, dict(distilled=0.80, distilled_wide=0.85), dict(distilled=0.68, distilled_wide=0.64))
    assert "held the held-out captions closer by same-seed similarity only" in mixed
    better = report({}, dict(distilled=0.80, distilled_wide=0.85), dict(distilled=0.68, distilled_wide=0.70))
    assert "More rows of the normal term held the held-out captions closer." in better
