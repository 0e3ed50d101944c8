"""The safetensors container that HF checkpoints and int4 folders both store their tensors in."""
