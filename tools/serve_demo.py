"""The main job: serve a tiny model with `vllm serve` on the Metal platform and ask it a question.

Makes a tiny random Llama checkpoint if absent (tools/make_tiny_model.py), starts vLLM's
OpenAI-compatible server on 127.0.0.1 through the vllm_metal plugin, sends a chat completion
with the `openai` client, prints the answer and stops the server (--keep-serving keeps it up).
The model is random, so the answer is fluent nonsense: the point is the whole path working.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serving import Server, ensure_tiny_model  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a model directory (default: a tiny random Llama)")
    parser.add_argument("--keep-serving", action="store_true")
    parser.add_argument("--question", default="What is MLX?")
    args = parser.parse_args()

    model = args.model or ensure_tiny_model("LlamaForCausalLM")
    server = Server(model, name="tiny-llama", extra_args=("--max-model-len", "1024"))
    print(f"starting: {' '.join(server.args[2:])}", flush=True)
    start = time.monotonic()
    server.start()
    print(f"server ready at {server.url} after {time.monotonic() - start:.0f}s", flush=True)
    try:
        reply = server.client().chat.completions.create(
            model="tiny-llama", messages=[{"role": "user", "content": args.question}],
            max_tokens=32, temperature=0.0)
        print(f"user: {args.question}")
        print(f"assistant: {reply.choices[0].message.content!r}")
        print(f"({reply.usage.prompt_tokens} prompt + {reply.usage.completion_tokens} "
              f"completion tokens, finish_reason={reply.choices[0].finish_reason})")
        if args.keep_serving:
            print(f"serving at {server.url}/v1 (Ctrl-C stops)", flush=True)
            server.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
