"""The embedded end-to-end RLHF demo (rlhf-fast demo)."""
