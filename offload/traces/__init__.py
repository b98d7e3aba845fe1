"""Routing traces: the `offload-routing-trace/1` format (format.py) and the recorder that writes them
from a running model (recorder.py). Analysis code: the runtime never imports this package."""
