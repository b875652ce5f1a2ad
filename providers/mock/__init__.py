"""``gengui mock-providers``: one local HTTP server speaking the RunPod, Replicate,
Gemini and OpenAI wire formats, for dev, tests and benchmarks.

    RunPod     /v2/{endpoint}/run | runsync | status/{id} | cancel/{id} | retry/{id} | health
    Replicate  /v1/predictions, /v1/models/{owner}/{name}/predictions,
               /v1/predictions/{id}, /v1/predictions/{id}/cancel, /files/{id}.png
    Gemini     /v1beta/models/{model}:predict | :generateContent
    OpenAI     /v1/images/generations

Point gengui at it with ``GENGUI_RUNPOD_API_URL=http://HOST:PORT/v2`` and
``GENGUI_{REPLICATE,GEMINI,OPENAI}_API_URL=http://HOST:PORT`` (any non-empty keys;
``GENGUI_REPLICATE_WEBHOOK_SECRET`` = the mock's secret; ``GENGUI_DOWNLOAD_HOSTS``
must name the mock's host and ``GENGUI_DOWNLOAD_ALLOW_HTTP=true``).

Behaviour is set server-wide (``MockConfig``: CLI flags, ``POST /_mock/config``) and
per job by directives in the prompt (``"a cat [mock:fail]"``); see
``providers.mock.config.Directives`` for the list and ``providers.mock.server`` for
the ``/_mock/`` control endpoints.
"""

from providers.mock.config import DEFAULT_REPLICATE_SECRET, Directives, MockConfig
from providers.mock.server import create_mock_app, serve

__all__ = ["DEFAULT_REPLICATE_SECRET", "Directives", "MockConfig", "create_mock_app", "serve"]
