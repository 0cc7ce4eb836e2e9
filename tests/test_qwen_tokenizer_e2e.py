"""A Qwen-shaped tokenizer without a mask token, end to end (issue 20): byte-level BPE with its special tokens added
after the merges, a ChatML chat template, EOS `<|im_end|>`, and an embedding table with padding rows past the
tokenizer, as Qwen2.5-Instruct ships them. convert (parquet corpus) -> SFT with the template (a parquet `messages`
dataset) -> generate -> serve, each through the real command line."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from cli_helpers import run_cli
from conftest import tiny_texts
from serve_helpers import running_server

from blockdiff.data.tasks import generate_examples
from blockdiff.data.tokenizer import load_tokenizer

# Qwen2.5's template, shortened to its ChatML core (default system turn, turns, generation prompt).
CHATML = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
PADDING_ROWS = 8  # Qwen2.5: 151,936 rows for 151,665 tokens
PADDING_VALUE = 5.0  # the untrained padding rows, far from any trained row


def qwen_chatml_dir(folder: Path) -> Path:
    """A random tiny Llama-architecture model (Qwen2's layout without biases) whose tokenizer is laid out like
    Qwen2.5-Instruct's (no mask token, ChatML template) and whose table has PADDING_ROWS rows past it."""
    from tokenizers import AddedToken

    from blockdiff.data.tokenizer import save_tokenizer, train_bpe_tokenizer
    from blockdiff.model.config import ModelConfig
    from blockdiff.model.hf_io import save_pretrained
    from blockdiff.model.transformer import Transformer

    raw = train_bpe_tokenizer(tiny_texts(200, 8_000), 320, [])
    raw.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in QWEN_SPECIALS])
    save_tokenizer(raw, folder, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML)
    tok = load_tokenizer(folder)
    assert tok.mask_id is None
    n = raw.get_vocab_size()
    cfg = ModelConfig(family="llama", vocab_size=n + PADDING_ROWS, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=True, max_position_embeddings=256)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    with torch.no_grad():
        model.tok_embeddings.weight[n:] = PADDING_VALUE
    save_pretrained(model, folder, tokenizer=tok)
    return folder


def _conversations(n: int, seed: int) -> list[list[dict]]:
    return [[{"role": "user", "content": e.prompt}, {"role": "assistant", "content": e.answer}]
            for e in generate_examples("train", n, seed=seed)]


RECIPE = """\
[model]
path = "{model}"
[data]
train = ["{train}"]
{extra}seq_len = 64
valid_rows = 4
[train]
batch_size = 2
eval_every = 100
save_every = 100
warmup_steps = 0
threads = 1
device = "cpu"
{objective}
[[phases]]
block_size = {block}
steps = 3
lr = 1e-3
[eval]
tasks = 0
"""


@pytest.mark.slow
def test_qwen_shaped_tokenizer_convert_sft_generate_serve(tmp_path):
    import openai
    import transformers

    parent = qwen_chatml_dir(tmp_path / "parent")
    ptok = load_tokenizer(parent)
    n = ptok.vocab_size
    (tmp_path / "corpus").mkdir()
    texts = tiny_texts(60, 3_000)
    for i in range(2):  # two shards named by a glob
        pq.write_table(pa.table({"text": texts[i::2], "id": list(range(len(texts[i::2])))}),
                       tmp_path / "corpus" / f"part-{i}.parquet")

    # convert: the mask token is added after the specials, inside the padding rows; its row starts as the mean
    (tmp_path / "convert.toml").write_text(RECIPE.format(model=parent, train="corpus/*.parquet", extra="", block=8,
                                                         objective=""))
    code, _, err = run_cli(["convert", "--recipe", tmp_path / "convert.toml", "--out", tmp_path / "conv",
                            "--no-progress"])
    assert code == 0, err
    converted = tmp_path / "conv" / "final"  # no [data] valid: no merge
    tok = load_tokenizer(converted)
    assert tok.mask_id == n and tok.token_to_id("<|mask|>") == n and tok.chat_template == CHATML
    assert json.loads((converted / "config.json").read_text())["vocab_size"] == n + PADDING_ROWS  # no row added
    from blockdiff.model.hf_io import load_pretrained

    before, after = load_pretrained(parent).tok_embeddings.weight, load_pretrained(converted).tok_embeddings.weight
    # 3 AdamW steps at lr 1e-3 move an element by at most ~3e-3: the row is still the mean, not a padding row
    torch.testing.assert_close(after[n], before[:n].mean(0), rtol=0, atol=0.01)
    torch.testing.assert_close(after[n + 1:], torch.full_like(after[n + 1:], PADDING_VALUE), rtol=0, atol=0.01)

    # SFT with the template on a parquet `messages` dataset
    convs = _conversations(12, seed=3)
    pq.write_table(pa.table({"conversation": convs}), tmp_path / "chat.parquet")
    (tmp_path / "sft.toml").write_text(RECIPE.format(
        model=converted, train="chat.parquet", extra='messages_field = "conversation"\n', block=8,
        objective='[objective]\nkind = "sft"'))
    code, _, err = run_cli(["train", "sft", "--recipe", tmp_path / "sft.toml", "--out", tmp_path / "sft",
                            "--no-progress"])
    assert code == 0, err
    from blockdiff.data.chat_template import ChatTemplate, tokenize_conversation

    hf_tok = transformers.AutoTokenizer.from_pretrained(converted)
    ex = tokenize_conversation(convs[0], tok, ChatTemplate(tok), 8)  # a row as SFT builds it
    k = len(ex.ids) - next(i for i, t in enumerate(reversed(ex.ids)) if t != tok.eos_id)  # before the EOS padding
    assert tok.decode(ex.ids[:k]) == hf_tok.apply_chat_template(convs[0], tokenize=False)
    assert set(ex.ids[k:]) == {tok.eos_id} and len(ex.ids) % 8 == 0
    assert tok.decode([i for i, m in zip(ex.ids[:k], ex.loss_mask) if m]) == convs[0][1]["content"] + "<|im_end|>\n"
    sft = tmp_path / "sft" / "final"
    assert load_tokenizer(sft).mask_id == n

    # generate
    code, out, err = run_cli(["generate", "--model", sft, "--prompt", convs[0][0]["content"], "--max-new-tokens", 8,
                              "--threads", 1, "--ignore-eos"])
    assert code == 0, err
    assert "8 tokens" in err and len(out) > 1 and out.endswith("\n")  # a random model's 8 tokens, decoded

    # serve: one chat request with the real openai client, the prompt rendered by the same template
    with running_server(sft, log=tmp_path / "serve.log") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model="final", messages=[{"role": "user", "content": "2 + 3 ="}],
                                               max_tokens=8, temperature=0)
        assert reply.choices[0].message.role == "assistant"
        assert isinstance(reply.choices[0].message.content, str)
        assert reply.usage.prompt_tokens == len(hf_tok.apply_chat_template(
            [{"role": "user", "content": "2 + 3 ="}], add_generation_prompt=True, tokenize=True, return_dict=False))
