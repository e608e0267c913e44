"""`python -m lit_mistral chat` on the demo model (SmolLM2-135M-Instruct, NF4, the demo config): turns piped in one per
line, in a pseudo-terminal for Ctrl+C."""

import os
import pty
import select
import signal
import subprocess
import sys
import time

from conftest import ROOT, popen_with_ctrl_c

# a small cache (as many positions as a few short exchanges), so that the conversation must be trimmed
FLAGS = ["--model.generation.max_new_tokens", "16", "--model.generation.max_cache_tokens", "96"]


def chat_command(*extra) -> list[str]:
    return [sys.executable, "-m", "lit_mistral", "chat", "--config", str(ROOT / "configs" / "demo.yaml"), *FLAGS,
            *extra]


def test_piped_turns_keep_the_history_trim_it_with_a_notice_and_reset(smollm2_gguf):
    turns = ["What is the capital of France?", "And of Italy?", "Name three colors.", "/reset",
             "What is the capital of France?", "/exit", "never read"]
    done = subprocess.run(chat_command(), input="\n".join(turns) + "\n", capture_output=True, text=True,
                          timeout=240, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stderr[-3000:]
    answers = done.stdout.split("\n")[:-1]
    assert len(answers) == 4 and all(answers), done.stdout  # one line each (short answers), none after /exit
    assert answers[0].startswith("The capital of France is Paris")
    assert "Rome" in answers[1]  # the second turn was answered in the context of the first
    assert "dropped its 1 oldest exchange" in done.stderr and "the KV cache holds 96 positions" in done.stderr
    assert "(conversation cleared)" in done.stderr
    assert answers[3] == answers[0]  # after /reset the conversation starts over: the same greedy answer


def test_ctrl_c_stops_the_answer_not_the_chat(smollm2_gguf):
    leader, follower = pty.openpty()
    process = popen_with_ctrl_c(chat_command("--model.generation.max_new_tokens", "400",
                                             "--model.generation.max_cache_tokens", "1024"),
                                stdin=follower, stdout=follower, stderr=follower, cwd=ROOT, close_fds=True,
                                env=dict(os.environ, PYTHONPATH=str(ROOT)), start_new_session=True)
    os.close(follower)
    seen = b""

    def read_until(marker: bytes, timeout: float) -> bool:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while marker not in seen and time.monotonic() < deadline:
            if select.select([leader], [], [], 0.2)[0]:
                try:
                    seen += os.read(leader, 4096)
                except OSError:
                    break
        return marker in seen

    try:
        assert read_until(b"> ", 240), seen[-2000:]
        os.write(leader, b"Write a long story about a dragon who learns to bake bread.\n")
        assert read_until(b"bread.\r\n", 30), seen[-2000:]  # the terminal's echo of the line
        asked = len(seen)
        deadline = time.monotonic() + 60
        while len(seen) < asked + 40 and time.monotonic() < deadline:  # the answer is streaming
            read_until(b"\0", 0.2)
        assert len(seen) >= asked + 40, seen[asked:]
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl+C sends to the terminal's foreground
        assert read_until(b"(stopped)", 30), seen[asked:][-2000:]
        assert read_until(b"> ", 10)
        os.write(leader, b"/exit\n")
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        os.close(leader)
