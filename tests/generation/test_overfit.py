"""End to end on CPU: a tiny GPT memorises four token grids, then regenerates them from their class labels."""

from __future__ import annotations

import torch

from fvq.generation import GPT, GPTConfig, generate, grid_to_tokens, tokens_to_grid


def test_overfit_four_sequences_and_regenerate_them(tmp_path):
    torch.manual_seed(0)
    vocab, grid = 24, (3, 4)
    data = torch.randint(0, vocab, (4, *grid), generator=torch.Generator().manual_seed(1))  # tokenizer-style grids
    indices = grid_to_tokens(data)  # (4, 12)
    classes = torch.arange(4)
    config = GPTConfig(
        dim=64, n_layer=2, n_head=4, vocab_size=vocab, grid=grid, num_classes=4, token_dropout_prob=0.0,
        resid_dropout_prob=0.0, ffn_dropout_prob=0.0,
    )  # fmt: skip
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    generator = torch.Generator().manual_seed(2)  # class dropout stays on: the null class is learned too
    for step in range(300):
        loss = model.train()(indices, classes, generator=generator).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 10 == 9:
            with torch.no_grad():
                if model.eval()(indices, classes).loss.item() < 0.02:
                    break
    model.eval()
    with torch.no_grad():
        assert model(indices, classes).loss.item() < 0.02
    assert torch.equal(generate(model, classes, temperature=0), indices)
    assert torch.equal(generate(model, classes, temperature=0, use_cache=False), indices)
    sampled = generate(model, classes, temperature=0.5, top_k=5, seed=3)
    assert torch.equal(sampled, indices)
    # through save / load, decoded to the tokenizer's grid shape
    model.save_pretrained(tmp_path / "gpt")
    loaded = GPT.from_pretrained(tmp_path / "gpt")
    assert torch.equal(tokens_to_grid(generate(loaded, classes, temperature=0), grid), data)
