"""Test oracles: small re-implementations of the documented semantics of the verl
and OpenRLHF functions that rlhf_fast.integrations replaces (written for these
tests from the behaviour described in their sources; not their code). verl and
OpenRLHF need Ray / DeepSpeed / vLLM to import, so tests/test_integrations.py
plants these modules in sys.modules under the real module paths and runs
patch() against them exactly as it would against the installed packages."""
