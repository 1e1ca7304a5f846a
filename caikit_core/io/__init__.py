"""Adapters between caikit's records and files outside a run directory: prompt
files (:mod:`caikit_core.io.prompts`), Hugging Face CAI datasets
(:mod:`caikit_core.io.export`) and Human/Assistant transcripts
(:mod:`caikit_core.io.transcripts`)."""
