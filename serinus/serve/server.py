"""`serinus serve`: load the model, build the app, run it under uvicorn.

uvicorn handles SIGTERM/SIGINT gracefully: it stops accepting connections, waits for the
requests in flight to be answered, then the app's shutdown ends the model thread.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

EPILOG = """\
endpoints (OpenAI's audio API):
  POST /v1/audio/transcriptions   multipart fields: file, model, language, response_format
                                  (json|text|srt|vtt|verbose_json), timestamp_granularities[],
                                  plus Canary's target_language, pnc and other prompt slots
  POST /v1/audio/translations     the same, target_language defaults to en
  GET  /v1/models, GET /health

examples:
  serinus serve --model nvidia/canary-1b-v2 --port 8000
  curl localhost:8000/v1/audio/transcriptions -F file=@talk.wav -F model=canary -F language=en
  serinus serve --model model.nemo --host 0.0.0.0 --api-key "$KEY" --max-batch 16 --queue 128

See docs/serve.md."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="serinus serve", description="An OpenAI-compatible transcription and "
                                "translation server that batches requests across clients.", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default="nvidia/canary-1b-v2",
                   help="Hub id, .nemo file or save_pretrained folder (default: %(default)s)")
    p.add_argument("--model-name", help="the id /v1/models reports (default: the --model name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together at most (default: %(default)s)")
    p.add_argument("--max-wait-ms", type=float, default=50,
                   help="how long a batch waits for more requests to join it (default: %(default)s)")
    p.add_argument("--queue", type=int, default=64,
                   help="requests waiting at most; beyond that the server answers 503 (default: %(default)s)")
    p.add_argument("--max-upload-mb", type=float, default=100, help="request body limit (default: %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("SERINUS_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every request (default: $SERINUS_API_KEY, else none)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "int8", "float16"], default="float32",
                   help="precision, as for serinus transcribe (int8: quantised Linear layers, CPU)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def model_id(name: str) -> str:
    path = Path(name)
    return path.stem if path.suffix == ".nemo" else path.name if path.exists() else name


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag, value, least in (("--max-batch", args.max_batch, 1), ("--queue", args.queue, 1),
                               ("--max-wait-ms", args.max_wait_ms, 0), ("--max-upload-mb", args.max_upload_mb, 0)):
        if value < least or (flag == "--max-upload-mb" and value == 0):
            parser.error(f"{flag} must be {'> 0' if flag == '--max-upload-mb' else f'>= {least}'}, got {value}")
    try:
        import python_multipart  # noqa: F401  (starlette's form parser)
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as e:
        print(f"serinus serve: error: {e.name} is not installed; install the server extra: "
              "pip install 'serinus[serve]'", file=sys.stderr)
        return 2

    import torch

    from serinus.checkpoint import load_model
    from serinus.serve.app import ServeConfig, create_app
    from serinus.transcribe import transcribe

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        model = load_model(args.model, device=device, dtype=args.dtype if args.dtype != "float16" else "float32")
        if args.dtype == "float16":
            model = model.to(torch.float16)
    except Exception as e:  # CheckpointError, a bad --device, ...
        print(f"serinus serve: error: cannot load model {args.model!r}: {e}", file=sys.stderr)
        return 2
    transcribe(model, [np.zeros(16000, dtype=np.float32)])  # warm-up, so the first request is not slower

    config = ServeConfig(model_id=args.model_name or model_id(args.model), max_batch=args.max_batch,
                         max_wait_ms=args.max_wait_ms, queue=args.queue, max_upload_mb=args.max_upload_mb,
                         api_key=args.api_key or None)
    app = create_app(model, config)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
