"""Ask Dispider about a video with the official OpenAI SDK, and print every answer with its video time.

    python clients/chat_example.py --video https://example.com/street.mp4 --question "Tell me when a bus stops."
    python clients/chat_example.py --video my_clip.mp4          # a local file goes inline, as a data: URL

Dispider watches the whole video and may answer several times, whenever it decides something is worth saying.
All answers stream in choice 0; each chunk carries an extension field, ``chunk.dispider = {"response": i,
"clip": c, "start": s, "end": e}``, that says which answer it belongs to and the span of video (seconds) that
prompted it. Answer i > 0 begins with a blank line, so the plain text reads well too.
"""

from __future__ import annotations

import argparse
import base64
import mimetypes
import os
import sys
from pathlib import Path

import openai
from openai import OpenAI


def video_url(video: str) -> str:
    """URLs pass through; a local file becomes a ``data:`` URL (the server's --max-upload-mb applies)."""
    if video.startswith(("http://", "https://", "data:", "file://")):
        return video
    path = Path(video)
    kind = mimetypes.guess_type(path.name)[0] or "video/mp4"
    return f"data:{kind};base64," + base64.b64encode(path.read_bytes()).decode()


def minutes(seconds: float) -> str:
    whole = int(round(seconds))
    return f"{whole // 60:02d}:{whole % 60:02d}"


def ask(client: OpenAI, video: str, question: str, *, model: str = "dispider", max_tokens: int | None = None,
        realtime: bool = False) -> None:
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": video_url(video)}},
            {"type": "text", "text": question},
        ]}],
        stream=True,
        max_tokens=max_tokens,
        extra_body={"realtime": realtime},  # True: the server plays the video at its own pace
    )
    current = None  # the answer being printed
    for chunk in stream:
        extension = (chunk.model_extra or {}).get("dispider") or {}
        choice = chunk.choices[0] if chunk.choices else None
        if choice and choice.delta.content:
            text = choice.delta.content
            if extension.get("response") != current:  # a new answer: a line of its own, with its video time
                label = f"[{minutes(extension['start'])}-{minutes(extension['end'])}] "
                print(("" if current is None else "\n") + label, end="")
                current, text = extension.get("response"), text.lstrip("\n")
            print(text, end="", flush=True)
        if choice and choice.finish_reason:
            # The last chunk: the extension now holds the totals.
            print(("\n" if current is not None else "") + f"-- {extension.get('responses', 0)} answers, {extension.get('decisions', 0)} clips decided "
                  f"(finish reason: {choice.finish_reason})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Stream Dispider's answers about a video through the OpenAI SDK.")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the server's OpenAI base URL")
    parser.add_argument("--api-key", default=os.environ.get("DISPIDER_API_KEY", "unused"),
                        help="for a server run with --tenants (default $DISPIDER_API_KEY; an open server ignores it)")
    parser.add_argument("--video", required=True, help="an http(s)/data:/file:// URL, or a local video file")
    parser.add_argument("--question", default="Tell me whenever something changes in the video.")
    parser.add_argument("--model", default="dispider")
    parser.add_argument("--max-tokens", type=int, help="longest answer")
    parser.add_argument("--realtime", action="store_true", help="let the server play the video in real time")
    args = parser.parse_args(argv)
    if not args.video.startswith(("http://", "https://", "data:", "file://")) and not Path(args.video).is_file():
        parser.error(f"no such video file: {args.video}")
    client = OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=600)
    try:
        ask(client, args.video, args.question, model=args.model, max_tokens=args.max_tokens, realtime=args.realtime)
    except openai.APIConnectionError as error:
        sys.exit(f"cannot reach {args.base_url}: {error} (is dispider-serve running?)")
    except openai.APIError as error:  # a refused request, or an error streamed mid-answer
        sys.exit(f"the server reported an error: {error.message}")
    except KeyboardInterrupt:
        sys.exit(130)  # the server sees the connection close and stops this request's work


if __name__ == "__main__":
    main()
