"""HF interop: our export loads as transformers' LlamaForCausalLM and computes the same thing."""

import json

import pytest
import torch

from totobench.errors import CheckpointError
from totobench.model import Toto, TotoConfig

transformers = pytest.importorskip("transformers")

CONFIG = TotoConfig(dim=64, n_layers=3, n_heads=4, mlp_hidden=96, codebook_size=50, vocab_size=53,
                    max_seq_len=64, rope_base=500.0, norm_eps=1e-5, resolution=32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = Toto(CONFIG).eval()
    # non-trivial norm gains, so a swapped norm would show
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    directory = tmp_path_factory.mktemp("hf")
    model.save_hf_llama(directory)
    return model, directory


def test_transformers_llama_matches_every_layer_and_logits(exported):
    model, directory = exported
    hf = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 37), generator=torch.Generator().manual_seed(3))
    last_block_out = []   # HF's last hidden state is after the final norm; capture the raw stream
    hook = hf.model.layers[-1].register_forward_hook(
        lambda m, a, o: last_block_out.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        out = hf(tokens, output_hidden_states=True)
        ours = model.forward_intermediates(tokens, list(range(CONFIG.n_layers)))
        logits = model(tokens)
    hook.remove()

    hidden = out.hidden_states   # [embeddings, block 0, ..., block n-2, norm(block n-1)]
    assert len(hidden) == CONFIG.n_layers + 1
    for i in range(CONFIG.n_layers - 1):
        assert (hidden[i + 1] - ours[i]).abs().max() < 1e-4, f"layer {i}"
    assert (last_block_out[0] - ours[-1]).abs().max() < 1e-4
    assert (hidden[-1] - model.norm(ours[-1])).abs().max() < 1e-4
    assert (out.logits - logits).abs().max() < 1e-4
    assert logits.abs().max() > 0.1   # the comparison is not between near-zero tensors


def test_from_hf_llama_round_trip(exported, tmp_path):
    model, directory = exported
    back = Toto.from_hf_llama(directory)
    assert back.config == CONFIG
    for (k, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k


def test_from_hf_llama_reads_a_transformers_saved_model(exported, tmp_path):
    model, directory = exported
    hf = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32)
    hf.save_pretrained(tmp_path)
    back = Toto.from_hf_llama(tmp_path)
    tokens = torch.randint(0, CONFIG.vocab_size, (1, 20))
    with torch.no_grad():
        assert (back(tokens) - model(tokens)).abs().max() < 1e-5


def test_from_hf_llama_rejects_grouped_query_attention(exported, tmp_path):
    _, directory = exported
    cfg = json.loads((directory / "config.json").read_text())
    cfg["num_key_value_heads"] = 2
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="num_key_value_heads=2 .* expected 4"):
        Toto.from_hf_llama(tmp_path)


def test_from_hf_llama_missing_weights_names_the_file(exported, tmp_path):
    _, directory = exported
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    with pytest.raises(CheckpointError, match="model.safetensors: missing"):
        Toto.from_hf_llama(tmp_path)
