"""``loom profile``: measure what the planner would otherwise estimate, and
write it as a schema-versioned JSON profile the planner reads (ARCHITECTURE.md:
the planner reads files, never live hardware).

Each kind of measurement lives in its own module and registers its command
on ``profile_app`` here.
"""

from __future__ import annotations

import typer

profile_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Measure links or layers and write a profile JSON.",
                          rich_markup_mode=None)

from loom.cli.profile_layers import gemm, layers  # noqa: E402 (registered on the group defined above)
from loom.cli.profile_links import links, nccl_tests  # noqa: E402

profile_app.command("links")(links)
profile_app.command("nccl-tests")(nccl_tests)
profile_app.command("layers")(layers)
profile_app.command("gemm")(gemm)
