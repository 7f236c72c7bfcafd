"""`mea serve`: transformers' OpenAI-compatible app with continuous batching over an MEA folder, driven by the real
`openai` client on loopback; texts must equal `generate(use_cache=False)` greedy."""

import socket
import time

import pytest
import torch
from helpers import tiny_model

pytest.importorskip("openai")
pytestmark = pytest.mark.slow  # a real server in a thread

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
NEW_TOKENS = 8


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def greedy_text(model, tokenizer, ids: list[int]) -> str:
    reference = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=False)
    return tokenizer.decode(reference[0, len(ids) :], skip_special_tokens=True)


def test_mea_serve_answers_like_generate(tmp_path, tokenizer):
    import openai

    from mea_hf.cli import build_parser
    from mea_hf.cli.serve import build_server
    from mea_hf.hub import save_folder

    tokenizer.chat_template = CHAT_TEMPLATE
    model = tiny_model(vocab_size=len(tokenizer), num_component_heads=1, eos_token_id=None)
    folder = save_folder(model, tmp_path / "mea", tokenizer)
    port = free_port()
    argv = ["serve", str(folder), "--port", str(port), "--device", "cpu", "--dtype", "float32",
            "--cb-num-blocks", "32", "--cb-page-size", "16", "--cb-max-batch-tokens", "16"]  # fmt: skip
    server = build_server(build_parser(argv).parse_args(argv), non_blocking=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=120, max_retries=0)
        name = str(folder.resolve())

        prompt = "The cat"
        completion = greedy_text(model, tokenizer, tokenizer(prompt).input_ids)
        done = client.completions.create(model=name, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0)
        assert done.choices[0].text == completion
        stream = client.completions.create(model=name, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0, stream=True)
        assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == completion

        messages = [{"role": "user", "content": "hello there"}]
        chat_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        expected = greedy_text(model, tokenizer, chat_ids["input_ids"])
        done = client.chat.completions.create(model=name, messages=messages, max_tokens=NEW_TOKENS, temperature=0)
        assert done.choices[0].message.content == expected
        stream = client.chat.completions.create(
            model=name, messages=messages, max_tokens=NEW_TOKENS, temperature=0, stream=True
        )
        assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == expected

        with pytest.raises(openai.BadRequestError) as bad:
            client.completions.create(model=name, prompt=[1, 2, 3], max_tokens=NEW_TOKENS)
        assert "prompt must be a string" in bad.value.response.text
        again = client.completions.create(model=name, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0)
        assert again.choices[0].text == completion  # the bad request did not stop the server
    finally:
        server.kill_server()
    assert not server._thread.is_alive()
