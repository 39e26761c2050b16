"""`serinus serve`: an OpenAI-compatible transcription and translation server.

    client --multipart upload--> app (auth, size limit, form checks, audio decoded in memory)
      -> batcher queue (bounded: full = 503) -> one model thread: up to --max-batch requests,
         or what arrived within --max-wait-ms, decoded as one `transcribe()` batch
      -> app renders json | text | srt | vtt | verbose_json

Modules: `uploads` (bytes -> 16 kHz samples, with the reason when they are not audio),
`batcher` (queue and model thread), `formats` (response bodies), `app` (routes, errors,
limits), `server` (the command line and uvicorn). Needs the `serve` extra: uvicorn, starlette,
python-multipart.
"""
