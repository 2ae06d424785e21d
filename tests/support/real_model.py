"""Write a tiny random-weight llama GGUF for the real-upstream tests (scripts/real-upstream.sh).

The weights are random (seeded, so the file and every greedy completion are the same each time); the output rows
of the control tokens and of the non-ASCII byte tokens are zero, so greedy decoding never picks them: a completion
never ends early on EOS and never holds a broken UTF-8 sequence, and `completion_tokens == max_tokens` exactly.
The size is chosen so that one token costs a few milliseconds on this machine's CPU: long streams last seconds,
which the disconnect test needs, and short ones take a fraction of a second.
"""

from __future__ import annotations

import sys

import gguf
import numpy as np

N_EMBD = 768
N_LAYER = 6
N_HEAD = 12
N_HEAD_KV = 4
N_FF = 2048
N_CTX = 4096
WORDS = (  # noqa: SIM905 (a sentence reads better than a list of 100 strings)
    "the a an of to in and is it that was for on are with as he be at by this have from or one had not but what "
    "all were when we there can your which their said if do will each about how up out them then she many some so "
    "these would other into has more her two like him see time could no make than first been its who now people "
    "my made over did down only way find use may water long little very after words called just where most know "
    "sidecar proxy token usage stream model request key lease record audit"
).split()
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def vocab() -> tuple[list[str], list[float], list[int], int]:
    """SentencePiece-style vocabulary: unk, bos, eos, 256 byte tokens, then letters and words."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    pieces = ["\u2581"] + list("abcdefghijklmnopqrstuvwxyz.,!?") + [f"\u2581{w}" for w in WORDS]
    tokens += pieces
    types += [gguf.TokenType.NORMAL] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return tokens, scores, [int(t) for t in types], 3 + 0x80


def write(path: str) -> None:
    rng = np.random.default_rng(20261123)
    tokens, scores, types, first_high_byte = vocab()
    n_vocab, head_dim = len(tokens), N_EMBD // N_HEAD
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("sidecar-random-tiny")
    w.add_context_length(N_CTX)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(CHATML)

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) / np.sqrt(cols)).astype(np.float16)

    ones = np.ones(N_EMBD, dtype=np.float32)
    w.add_tensor("token_embd.weight", mat(n_vocab, N_EMBD))
    for i in range(N_LAYER):
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.attn_q.weight", mat(N_EMBD, N_EMBD))
        w.add_tensor(f"blk.{i}.attn_k.weight", mat(N_HEAD_KV * head_dim, N_EMBD))
        w.add_tensor(f"blk.{i}.attn_v.weight", mat(N_HEAD_KV * head_dim, N_EMBD))
        w.add_tensor(f"blk.{i}.attn_output.weight", mat(N_EMBD, N_EMBD))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.ffn_gate.weight", mat(N_FF, N_EMBD))
        w.add_tensor(f"blk.{i}.ffn_up.weight", mat(N_FF, N_EMBD))
        w.add_tensor(f"blk.{i}.ffn_down.weight", mat(N_EMBD, N_FF))
    w.add_tensor("output_norm.weight", ones)
    output = mat(n_vocab, N_EMBD)
    output[:3] = 0  # unk, bos, eos: never the greedy choice
    output[first_high_byte : 3 + 256] = 0  # bytes 0x80-0xFF: no broken UTF-8
    w.add_tensor("output.weight", output)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    write(sys.argv[1])
