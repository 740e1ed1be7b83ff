"""`llmasos serve`: the OpenAI-compatible server over one or more models."""

from __future__ import annotations

from pathlib import Path

import click


def _default_model() -> str | None:
    """The bundled default model's name once it is registered, else None (the server then loads on demand only)."""
    from llmasos.errors import LLMasOSError
    from llmasos.library import default_model_name

    try:
        return default_model_name()
    except LLMasOSError:
        return None


def _adapters(values: tuple[str, ...]) -> dict[str, str]:
    """--lora NAME=ADAPTER values as {name: adapter directory} (a library model's adapter, or a directory)."""
    from llmasos.library import resolve_model
    from llmasos.library.names import is_valid_name

    adapters: dict[str, str] = {}
    for value in values:
        name, _, adapter = value.partition("=")
        if not name or not adapter:
            raise click.BadParameter(f"{value!r}: use NAME=ADAPTER_DIR or NAME=LIBRARY_MODEL", param_hint="--lora")
        if name in adapters:
            raise click.BadParameter(f"two adapters are named {name!r}", param_hint="--lora")
        if is_valid_name(adapter) and not Path(adapter).is_dir():
            resolved = resolve_model(adapter)
            if resolved.adapter is None:
                raise click.BadParameter(f"library model {adapter!r} has no ADAPTER line", param_hint="--lora")
            adapter = str(resolved.adapter)
        adapters[name] = adapter
    return adapters


def _keep_alive(_ctx, _param, value: str) -> float:
    from llmasos.server.lifecycle import parse_keep_alive

    try:
        return parse_keep_alive(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command()
@click.option("--model", "-m", "models", multiple=True,
              help="Serve only these models (library name or checkpoint directory; repeatable), loaded at start. "
                   "Without it the server serves the whole library: the default model is loaded at start and any "
                   "other loads on its first request.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--served-model-name", default=None, help="Model id clients use (one model only).")
@click.option("--dtype", default="auto", show_default=True)
@click.option("--device", default="auto", show_default=True,
              help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N.")
@click.option("--kv-cache-memory", default=None, help="KV cache budget per model, e.g. 2GiB.")
@click.option("--max-num-seqs", default=256, show_default=True, type=int)
@click.option("--quantization", type=click.Choice(["int8", "int4", "w8a8"]), default=None,
              help="Quantize at load: weight-only int8 (per channel) or int4 (group-wise), or w8a8 (int8 weights "
                   "and per-call int8 activations, fastest on CPU).")
@click.option("--quantization-group-size", type=click.Choice(["32", "64", "128"]), default=None,
              help="int4 group size (default 32).")
@click.option("--num-threads", type=click.IntRange(min=1), default=None,
              help="Torch threads per engine (default: the idle cores, re-checked while serving).")
@click.option("--engine-process/--engine-in-process", default=True, show_default=True,
              help="Run each model's engine in a process of its own (the default) or in the server's.")
@click.option("--max-queue", default=512, show_default=True, type=int, help="Waiting requests before 503.")
@click.option("--max-body-bytes", default=4 << 20, show_default=True, type=int)
@click.option("--price-table", type=click.Path(dir_okay=False), default=None,
              help='JSON {"model": {"input": $/1M, "output": $/1M}}.')
@click.option("--shutdown-timeout", default=30.0, show_default=True, type=float)
@click.option("--allow-unauthenticated", is_flag=True, help="Allow a non-loopback bind with no API keys.")
@click.option("--allowed-hosts", multiple=True, metavar="NAME",
              help="Host header a server without keys also answers (repeatable; '.example.com' and its subdomains, "
                   "'*' any). By default only localhost, 127.0.0.1, [::1] and the bind address: a guard against DNS "
                   "rebinding. GET /health answers any Host (probes send the pod's IP).")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN",
              help="Origin whose web pages may call the API, e.g. https://app.example.com (repeatable; '*' any). "
                   "Other origins get no CORS headers.")
@click.option("--timeout-keep-alive", default=5.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds an idle connection stays open between requests.")
@click.option("--header-timeout", default=10.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds a client has to send a request's headers; then 408 and the connection is closed.")
@click.option("--body-timeout", default=60.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds a client has to send a request's body after its headers; then 408 and close.")
@click.option("--max-connections-per-client", default=64, show_default=True, type=click.IntRange(min=0),
              help="Open connections per client address (more are refused with 429); 0: no cap.")
@click.option("--keep-alive", default="5m", show_default=True, callback=_keep_alive,
              help="How long a model loaded on demand stays loaded after its last request (seconds, '10m', '1h'; "
                   "-1: until `llmasos stop`). Models named with --model stay until stopped. A request's own "
                   "keep_alive overrides it.")
@click.option("--max-loaded-models", default=3, show_default=True, type=click.IntRange(min=1),
              help="Models held at once; loading one more unloads the least recently used idle one.")
@click.option("--lora", "loras", multiple=True, metavar="NAME=ADAPTER",
              help="Serve a LoRA adapter unmerged on the --model base as model id NAME (ADAPTER: a PEFT adapter "
                   "directory, or a library model with an ADAPTER line); repeatable.")
@click.option("--lora-dir", "lora_dirs", multiple=True, type=click.Path(file_okay=False),
              help="A directory POST /v1/load_lora_adapter may load adapters from (repeatable); library adapters "
                   "are always allowed.")
@click.option("--max-loras", default=8, show_default=True, type=click.IntRange(min=1),
              help="LoRA adapters resident at once on a base (distinct adapters in one batch).")
@click.option("--tool-call-parser", type=click.Choice(["hermes", "llama3_json", "mistral"]), default=None,
              help="The format tool calls are parsed from and forced in (default: chosen from each model's chat "
                   "template; hermes for templates without tools).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"], case_sensitive=False))
@click.option("--log-format", default="text", show_default=True, type=click.Choice(["text", "json"]),
              help="Server and access log lines as text, or as one JSON object a line.")
def serve(models, host, port, served_model_name, dtype, device, kv_cache_memory, max_num_seqs, quantization,
          quantization_group_size, num_threads, engine_process, max_queue, max_body_bytes, price_table,
          shutdown_timeout, allow_unauthenticated, allowed_hosts, cors_origins, timeout_keep_alive, header_timeout,
          body_timeout, max_connections_per_client, keep_alive, max_loaded_models, loras, lora_dirs, max_loras,
          tool_call_parser, log_level, log_format) -> None:
    """Serve models over the OpenAI API (completions, chat, embeddings; classify, score and rerank).

    The port is bound before any model loads (a port in use fails at once); models named with --model are loaded
    next, and the server serves them only; without --model it serves every library model by name."""
    import logging.config

    from llmasos.db import get_engine
    from llmasos.server.lifecycle import ModelManager
    from llmasos.server.logs import logging_config
    from llmasos.server.metering import PriceTable
    from llmasos.server.serving import bind_socket, check_bind, load_served_model, run_server, startup_banner
    from llmasos.server.state import ServerSettings
    from llmasos.spec import resolve_spec

    logging.config.dictConfig(logging_config(log_level, log_format))
    get_engine()  # the database's schema is checked (an embedded one upgraded) before anything loads
    check_bind(host, allow_unauthenticated)  # before minutes of loading
    if served_model_name and len(models) != 1:
        raise click.UsageError("--served-model-name applies to a single --model")
    if engine_process:  # this process only does HTTP and text: leave the cores to the engines' torch threads
        import torch

        torch.set_num_threads(1)
    settings = ServerSettings(host=host, port=port, max_body_bytes=max_body_bytes, max_queue=max_queue,
                              shutdown_timeout=shutdown_timeout, allow_unauthenticated=allow_unauthenticated,
                              price_table=PriceTable.from_file(price_table) if price_table else PriceTable(),
                              allowed_hosts=allowed_hosts, cors_origins=cors_origins,
                              timeout_keep_alive=timeout_keep_alive, header_timeout=header_timeout,
                              body_timeout=body_timeout, max_connections_per_client=max_connections_per_client,
                              log_format=log_format, tool_call_parser=tool_call_parser, lora_dirs=lora_dirs)
    load_options = dict(engine_process=engine_process, dtype=dtype, device=device, quantization=quantization,
                        quantization_group_size=int(quantization_group_size or 0) or None,
                        kv_cache_memory=kv_cache_memory, max_num_seqs=max_num_seqs, num_threads=num_threads,
                        max_loras=max_loras)
    library = not models
    names = models or tuple(name for name in (_default_model(),) if name)
    # Resolve every named model first (seconds): a misspelt name fails before the port is taken.
    specs = [resolve_spec(name, **{k: v for k, v in load_options.items() if k != "engine_process"})
             for name in names]
    if loras:
        if len(specs) != 1:
            raise click.UsageError("--lora applies to a single --model (the base the adapters were trained on)")
        specs[0] = specs[0].replace(lora_adapters=_adapters(loras))
    if len({served_model_name or spec.name for spec in specs}) != len(specs):
        raise click.UsageError("two models would be served under one name; give distinct names")
    sock = bind_socket(host, port)
    try:
        served = {}
        for spec in specs:
            click.echo(f"loading {served_model_name or spec.name} ...", err=True)
            model = load_served_model(spec, served_model_name, engine_process=engine_process)
            served[model.id] = model
        manager = ModelManager(served, library=library, load_options=load_options,
                               max_loaded=max(max_loaded_models, len(served)), keep_alive=keep_alive)
    except BaseException:
        sock.close()
        raise
    click.echo(startup_banner(manager, settings), err=True)
    run_server(manager, settings, log_level, sock=sock)


def register(cli: click.Group) -> None:
    cli.add_command(serve)
