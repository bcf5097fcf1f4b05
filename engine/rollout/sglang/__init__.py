"""The SGLang inference backend: server processes, their HTTP client, and weight sync.

The contract followed is SGLang 0.5.9's HTTP API (docs/sglang.md names the files). Nothing here
imports sglang: the client and the weight sync speak HTTP and torch.distributed, and only the
server actor needs sglang installed (it starts `python -m sglang.launch_server`).
"""
