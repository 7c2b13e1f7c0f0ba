"""LoRA adapters: the merged weights compute what the wrapped model computed during training."""

import copy

import pytest

from workers.runners import adapter


def tiny_bert():
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    return BertModel(config).eval()


def test_every_linear_layer_of_every_encoder_layer_is_a_target():
    names = adapter.target_names(tiny_bert())
    assert len(names) == 2 * len(adapter.TARGETS)
    assert "encoder.layer.1.attention.self.query" in names and "encoder.layer.0.output.dense" in names
    assert not any(n.startswith("pooler") or "embeddings" in n for n in names)
    # attention.output.dense and output.dense are different layers, each named once
    assert len(set(names)) == len(names)


def test_merged_weights_give_the_wrapped_models_outputs(tmp_path):
    import torch
    from safetensors.torch import save_file

    base = tiny_bert()
    trained = copy.deepcopy(base)
    names = adapter.wrap(trained, rank=4, alpha=8, dropout=0.1)
    assert all(not p.requires_grad for n, p in trained.named_parameters() if "lora_" not in n)
    with torch.no_grad():
        for name in names:  # as if trained: B is no longer zero
            trained.get_submodule(name).lora_B.normal_(0, 0.2)
    trained.eval()
    ids = torch.tensor([[2, 17, 33, 9, 3], [2, 41, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    want = trained(input_ids=ids, attention_mask=mask).last_hidden_state
    before = base(input_ids=ids, attention_mask=mask).last_hidden_state
    path = tmp_path / "adapter.safetensors"
    save_file(adapter.adapter_state(trained, names), str(path))

    assert adapter.merge(base, path, rank=4, alpha=8) == len(names)
    got = base(input_ids=ids, attention_mask=mask).last_hidden_state
    assert not torch.allclose(before, want, atol=1e-3)  # the adapter changes the outputs
    assert torch.allclose(got, want, atol=1e-5)


def test_an_adapter_for_another_shape_is_refused(tmp_path):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "adapter.safetensors"
    save_file({"encoder.layer.0.attention.self.query.lora_A": torch.zeros(4, 48),
               "encoder.layer.0.attention.self.query.lora_B": torch.zeros(32, 4)}, str(path))
    with pytest.raises(ValueError, match="attention.self.query"):
        adapter.merge(tiny_bert(), path, rank=4, alpha=8)
    save_file({"encoder.layer.7.output.dense.lora_A": torch.zeros(4, 64),
               "encoder.layer.7.output.dense.lora_B": torch.zeros(32, 4)}, str(path))
    with pytest.raises(AttributeError):
        adapter.merge(tiny_bert(), path, rank=4, alpha=8)
