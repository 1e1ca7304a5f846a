"""Tests of the bundled ``vllm`` plugin. ``test_plugin.py`` runs in any environment;
``test_vllm.py`` needs vLLM and runs in .venv-vllm (``make test-vllm``)."""
