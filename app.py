"""Serve Dori Lab in the browser.

    python app.py                                    # the bundled demo model, on http://127.0.0.1:7860
    python app.py --model path/to/sd-pipeline --device cuda --dtype float16
    python app.py --model a --model b --allowed-root ~/models   # start on a; a session may switch to b or to a
                                                                 # pipeline folder inside ~/models
    python app.py --model path/to/sd-v1-4 --memorized path/to/images --sscd sscd_disc_mixup.torchscript.pt
"""

from __future__ import annotations

if __name__ == "__main__":  # before torch loads: the app computes in worker threads
    from analysis.worker_threads import prepare_for_worker_threads

    prepare_for_worker_threads()

import argparse

import torch

from analysis.limits import MAX_RUN_SECONDS, MAX_UPLOAD_BYTES
from analysis.metrics import SSCD_THRESHOLD
from analysis.model import ModelLoadError, open_model
from analysis.projection import warm_up_in_background
from dori_ui.app import build_app, launch_options


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=[],
                   help="diffusers Stable Diffusion folder or hub id (default: the bundled demo model); repeat it to "
                        "offer several, the first is loaded at start")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 exposes the app to the network)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--allowed-root", action="append", default=[], metavar="DIR",
                   help="a folder whose pipeline folders a session may switch to (repeatable); "
                        "no other path typed in the app is opened")
    p.add_argument("--memorized", metavar="DIR",
                   help="the first model's memorized set: an imagefolder (images + metadata.csv or metadata.jsonl "
                        "with columns file_name and text or caption); replaces its memorized.json")
    p.add_argument("--reference-prompts", metavar="FILE",
                   help="non-memorized prompts (CSV or JSON) for NeMo, Wanda and the trigger map (default: the "
                        "model's, else SD v1.4's 500 unmemorized LAION prompts)")
    p.add_argument("--sscd", metavar="FILE", help="judge replication by SSCD (a TorchScript file) in every view")
    p.add_argument("--normal", metavar="DIR",
                   help="ordinary image-caption pairs (an imagefolder) for the Fine-tune view's normal term; default: "
                        "the model's own generations, made once and cached")
    p.add_argument("--sscd-threshold", type=float, metavar="T",
                   help=f"SSCD similarity above which a generation is a replica (default {SSCD_THRESHOLD})")
    p.add_argument("--max-run-seconds", type=float, default=MAX_RUN_SECONDS,
                   help=f"stop a run that takes longer than this, and say so (default {MAX_RUN_SECONDS})")
    p.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_BYTES / 2**20,
                   help=f"largest file a user may upload, in MiB (default {MAX_UPLOAD_BYTES // 2**20})")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    warm_up_in_background()  # the first UMAP map would otherwise wait for numba to compile
    try:
        handle = open_model(args.model[0] if args.model else None, device=args.device, dtype=args.dtype,
                            memorized=args.memorized, reference_prompts=args.reference_prompts, sscd=args.sscd,
                            sscd_threshold=args.sscd_threshold, normal=args.normal)
    except (ModelLoadError, ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from err
    if not args.max_run_seconds > 0 or not args.max_upload_mb > 0:
        raise SystemExit("error: --max-run-seconds and --max-upload-mb must be positive")
    app = build_app(handle, sources=args.model[1:], allowed_roots=args.allowed_root,
                    max_run_seconds=args.max_run_seconds)
    app.launch(server_name=args.host, server_port=args.port,
               **launch_options(max_upload_bytes=int(args.max_upload_mb * 2**20)))


if __name__ == "__main__":
    main()
