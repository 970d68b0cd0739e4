"""Audio for the OpenAI-compatible speech API: encoding (PyAV), sentences for streaming."""
