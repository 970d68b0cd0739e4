"""The Hugging Face mirror: installed ``huggingface`` models served back in the Hub's read
protocol under ``/hf`` (``HF_ENDPOINT=http://host:8000/hf``).

``protocol.py`` holds every decision (which revision a name means, what a tree listing or a
``resolve`` answer says, ETags and git ids, ranges, the Hub's error codes) and does no I/O;
``index.py`` reads the store's manifests (blocking: call it in a thread); ``stats.py``
counts what the mirror served. The routes are ``api/hf.py``.
"""
