"""Clients of ``dispider-serve``.

- :mod:`clients.stream_video` (``dispider-stream``): stream a video file or a camera into a live session at
  real-time pace and print each decision and answer with its video time.
- :mod:`clients.chat_example`: the OpenAI SDK against ``/v1/chat/completions``, streamed.
- :mod:`clients.server_metrics`: read the server's Prometheus ``/metrics`` (counters, histogram quantiles).
- :mod:`clients.local_server`: run ``dispider-serve`` as a child process on loopback (the demo, the load benchmark).
"""
