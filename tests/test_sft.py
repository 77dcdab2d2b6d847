import torch

from data import ASSISTANT, EOT, chat_batch, encode_chat
from model import GPT, GPTConfig


def test_prompt_tokens_as_targets_never_change_the_loss(enc):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=enc.n_vocab, n_layer=1, n_head=2, n_embd=16))
    tokens, mask = encode_chat(enc, "Write f(x) that returns x.", "def f(x):\n    return x\n")
    other = list(tokens)
    first_prompt = 2  # after <|endoftext|> <|user|>
    other[first_prompt] = (other[first_prompt] + 1) % 256  # another prompt token, same mask
    pad = enc.encode_single_token(EOT)
    x, y = chat_batch([(tokens, mask)], pad, torch.device("cpu"))
    _, y_other = chat_batch([(other, mask)], pad, torch.device("cpu"))
    assert torch.equal(y, y_other)
    assert model(x, y)[1].item() == model(x, y_other)[1].item()


def test_sft_supervises_exactly_the_assistant_tokens(enc):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=enc.n_vocab, n_layer=1, n_head=2, n_embd=16))
    response = "def f(x):\n    return x * 3\n"
    tokens, mask = encode_chat(enc, "Triple it.", response)
    x, y = chat_batch([(tokens, mask), encode_chat(enc, "A longer request than the other.", "pass\n")],
                      enc.encode_single_token(EOT), torch.device("cpu"))
    n_response = len(enc.encode_ordinary(response)) + 1  # and the end token
    assert int((y[0] >= 0).sum()) == n_response
    logits = model(x)[0].detach().requires_grad_()
    loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1)
    loss.backward()
    supervised = (logits.grad.abs().sum(-1) > 0)
    assert torch.equal(supervised, y >= 0)
    start = tokens.index(enc.encode_single_token(ASSISTANT))  # the position that predicts the first answer token
    assert supervised[0, start:start + n_response].all() and not supervised[0, :start].any()
