"""What the private prompt cache costs: multi-turn chats on a real llama-server with the prompt cache
off (`models[].prompt_cache: off`, the default: `--no-cache-prompt`) and shared (llama-server's default).

    python -m benchmarks.prompt_cache [--conversations 6] [--turns 6] [--out DIR]   # about 3 minutes here

Each conversation has a system prompt (about 300 tokens) and `turns` turns; each turn adds a user
message (about 40 tokens) and a 32-token answer (ignore_eos), so turn k's prompt holds all earlier
turns. Both servers run side by side (2 slots, --cache-ram 0, as hpcserve's job starts them); the
requests are sent one at a time, alternating which server goes first per conversation, straight to
llama-server (HAProxy adds the same to both). Per turn it records the time to the first streamed
token (TTFT, seconds) and the prompt tokens llama-server processed (timings.prompt_n) and reused
(timings.cache_n). Writes prompt-cache.json (with the commit, versions and machine) and prints the
medians per turn.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import click
import httpx

from benchmarks.common import KEY, MODEL, dated, provenance, start_llama_server

SYSTEM = ("You are the help desk assistant of a computing centre. " * 30).strip()
QUESTIONS = ["How do I submit a job to the GPU partition?", "What is the time limit of the long queue?",
             "How can I see why my job is still pending?", "Where should I keep large datasets?",
             "How do I load the CUDA module before running?", "Can I run a notebook on a compute node?",
             "How do I cancel all my jobs at once?", "What does the fair share factor mean for me?"]


def turn(url: str, messages: list[dict]) -> tuple[float, dict, str]:
    """One streamed chat completion: (TTFT s, the final timings, the answer text)."""
    started = time.perf_counter()
    ttft, timings, text = None, {}, []
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=300, headers={"Authorization": f"Bearer {KEY}"},
                      json={"messages": messages, "max_tokens": 32, "ignore_eos": True, "stream": True,
                            "temperature": 0}) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: "):])
            for choice in chunk.get("choices", []):
                content = (choice.get("delta") or {}).get("content")
                if content:
                    ttft = ttft if ttft is not None else time.perf_counter() - started
                    text.append(content)
            timings = chunk.get("timings", timings)
    assert ttft is not None, "no token streamed"
    return ttft, timings, "".join(text)


@click.command()
@click.option("--conversations", type=click.IntRange(min=1), default=6, show_default=True)
@click.option("--turns", type=click.IntRange(min=1, max=len(QUESTIONS)), default=6, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=dated("prompt-cache"), show_default=True)
def main(conversations: int, turns: int, out: Path) -> None:
    """Multi-turn TTFT with the prompt cache off and shared (see the module docstring)."""
    out.mkdir(parents=True, exist_ok=True)
    servers = {}
    try:
        for name, flags in (("off", ("--no-cache-prompt",)), ("shared", ())):
            servers[name] = start_llama_server(MODEL, out / f"llama-{name}.log", parallel=2, ctx=8192, threads=2,
                                               flags=("--cache-ram", "0", *flags))
        results: dict[str, list[list[dict]]] = {"off": [], "shared": []}
        for c in range(conversations):
            order = ("off", "shared") if c % 2 == 0 else ("shared", "off")
            history = {name: [{"role": "system", "content": SYSTEM}] for name in order}
            for name in order:
                results[name].append([])
            for t in range(turns):
                for name in order:
                    url = f"http://127.0.0.1:{servers[name][1]}"
                    history[name].append({"role": "user", "content": f"{QUESTIONS[t]} (conversation {c})"})
                    ttft, timings, text = turn(url, history[name])
                    history[name].append({"role": "assistant", "content": text})
                    results[name][-1].append({"ttft_s": round(ttft, 4), "prompt_n": timings.get("prompt_n"),
                                              "cache_n": timings.get("cache_n")})
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(10)
    summary = {name: [{"turn": t + 1,
                       "ttft_median_s": round(statistics.median(conv[t]["ttft_s"] for conv in runs), 4),
                       "prompt_n_median": statistics.median(conv[t]["prompt_n"] for conv in runs),
                       "cache_n_median": statistics.median(conv[t]["cache_n"] for conv in runs)}
                      for t in range(turns)] for name, runs in results.items()}
    document = {"meta": {**provenance(), "model": MODEL.name, "conversations": conversations, "turns": turns,
                         "finished": time.strftime("%Y-%m-%d %H:%M:%S")},
                "summary": summary, "runs": results}
    (out / "prompt-cache.json").write_text(json.dumps(document, indent=1) + "\n")
    click.echo(f"{'turn':>4} {'off: TTFT s':>12} {'prompt tok':>10} {'shared: TTFT s':>15} {'prompt tok':>10} {'reused':>7}")
    for off, shared in zip(summary["off"], summary["shared"]):
        click.echo(f"{off['turn']:>4} {off['ttft_median_s']:>12.3f} {off['prompt_n_median']:>10.0f} "
                   f"{shared['ttft_median_s']:>15.3f} {shared['prompt_n_median']:>10.0f} {shared['cache_n_median']:>7.0f}")
    click.echo(f"wrote {out / 'prompt-cache.json'}")


if __name__ == "__main__":
    main()
