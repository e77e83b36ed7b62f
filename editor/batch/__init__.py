"""Batch JSON template filling (docs/batch.md): `template` (JSON templates with masks and
placeholders), `schema` (JSON Schema -> template), `runner` (batched, resumable filling of JSONL
records) and `commands` (`editor batch`). Inference-side: nothing here imports the server or the
database; the API's batch jobs call the runner."""
