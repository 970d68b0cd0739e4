"""What each family computes: the bodies of its ``predict`` / ``synthesize`` and its batch
plans, one concern per module, called by the family adapters (``runtime/families/``).

This is the layer under the dispatch: a module here imports neither the family registry
nor ``runtime/inference.py`` (which looks a model's adapter up and calls into the adapter,
which calls into here), so no import loop runs through the adapters. Most of them import
torch at the top, so the adapters import them inside the methods that run a model: an
adapter's module must import without torch (the server detects families without it).

- ``model``: holding a loaded model for a forward (its lock, device, dtype);
- ``inputs``: a request's texts and integer parameters, checked;
- ``text_batch``: texts as one padded batch, and each caller's rows of it;
- ``labels``: ranked labels from class probabilities;
- ``text_classification``, ``embedding``, ``generation``, ``image_classification``,
  ``transcribe``, ``tensors``: each task's ``predict`` (and batch plan where it batches);
- ``speech``: one waveform at a time under the model's lock, seeded (``speak_one``);
- ``waveforms``: SpeechT5's, Bark's and Tacotron2's waveform of one text;
- ``vits``: VITS, batched, each item's noise from its own seed.
"""
