"""The parts of transcription, in the order the data flows through them:
inputs -> options -> plan -> decode -> merge -> results. `serinus.transcribe` drives them."""
