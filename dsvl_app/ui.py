"""The Gradio 6 Blocks app: `build_app(engine, settings) -> gr.Blocks`.

Event chains (every chain that runs the model shares the concurrency group "gpu"):

    send / example / retry / edit:  check   (checks the message into the `proposal` State; a refusal is a
                                             notice that leaves the chat and the input box as they are)
                                    .success(show_staged)   (shows the user turn and a waiting bubble)
                                    .success(answer)   (queued in "gpu", streams; its failures are notices too)
                                    .then / .failure(finish)   (unlocks the input; after a failure or a Stop
                                                                before the start, puts the message back)
    Stop:   sets the session's cancel event (the engine stops within a token) and cancels the queued event.
    /chat:  the API endpoint (gradio_client): same checks and generation, history kept per client session.
"""

from __future__ import annotations

import html
import json
import logging
import shutil
import socket
import uuid
from contextlib import aclosing
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.utils import NamedString

from . import history, limits, rendering
from . import system_prompt as sysprompt
from .runtime import Runtime, UserError, failure_message, generation_params
from .settings import QUANTIZATION_COSTS, Settings
from .uploads import UploadError, check_files, check_image, human_size

log = logging.getLogger("dsvl_app")

ASSETS = Path(__file__).resolve().parent.parent / "assets"
GPU = "gpu"

CSS = """
#dsvl-banner { display:flex; flex-wrap:wrap; gap:.4rem .9rem; align-items:center; font-size:.92rem;
               padding:.4rem .9rem; border-radius:10px; background:var(--block-background-fill);
               border:1px solid var(--border-color-primary); }
#dsvl-banner .name { font-weight:700; font-size:1.05rem; }
#dsvl-banner .chip { padding:.1rem .5rem; border-radius:999px; background:var(--background-fill-secondary);
                     border:1px solid var(--border-color-primary); font-family:var(--font-mono); font-size:.82rem; }
/* the test-model warning: the theme's error colours, so that it reads in light and dark mode alike */
#dsvl-random { margin-top:.3rem; padding:.4rem .8rem; border-radius:10px; font-weight:600; font-size:.9rem;
               background:var(--error-background-fill); color:var(--error-text-color);
               border:2px solid var(--error-border-color); }
#dsvl-random code { background:transparent; color:inherit; font-weight:700; padding:0; }
#dsvl-context { font-size:.85rem; color:var(--body-text-color-subdued); min-height:1.4rem; padding:0 .3rem; }
#dsvl-context .warn { color:#b45309; font-weight:600; }
#dsvl-tools button { min-width:0; }
/* code is set at the size of the text around it (Gradio's default is smaller) */
#dsvl-chat .message code, #dsvl-chat .message pre { font-size:inherit; }
/* a user message's copy/edit buttons sit under the bubble, clear of the chat's own delete / copy-all buttons */
#dsvl-chat .message-row.user-row .message-buttons-right { position:static; }
/* the example cards look like cards in light mode too */
#dsvl-chat .example { border:1px solid var(--border-color-primary); background:var(--block-background-fill);
                      box-shadow:var(--shadow-drop); }
/* a phone: a shorter chat, so that the title, the warning and the input box all fit the first screen */
@media (max-width: 640px) {
  #dsvl-chat { height:auto !important; min-height:260px !important; max-height:42vh !important; }
  #dsvl-random { font-size:.82rem; padding:.35rem .6rem; }
  #dsvl-banner { font-size:.8rem; gap:.2rem .4rem; padding:.4rem .6rem; }
  #dsvl-banner .chip:nth-of-type(n+4) { display:none; }
}
/* a user turn's images: one row of captioned thumbnails (captions = Image 1, Image 2, …) */
#dsvl-chat .message.user .gallery-container .grid-wrap { height:auto !important; min-height:0 !important;
    max-height:none !important; overflow:visible !important; padding:4px !important; }
#dsvl-chat .message.user .gallery-container .grid-container { display:grid !important;
    grid-template-columns:repeat(var(--grid-cols), 168px) !important; grid-auto-rows:168px !important;
    gap:8px !important; justify-content:end; }
#dsvl-chat .message.user:has(.gallery-container) { width:auto !important; max-width:100%; }
#dsvl-chat .caption-label { font-weight:600; }
footer { opacity:.85; }
"""

# Maths as DeepSeek writes it: $…$ and \(…\) inline, $$…$$ and \[…\] on a line of their own.
LATEX = [{"left": "$$", "right": "$$", "display": True}, {"left": "\\[", "right": "\\]", "display": True},
         {"left": "$", "right": "$", "display": False}, {"left": "\\(", "right": "\\)", "display": False}]

# On page load. The input box's send/stop buttons are icons: give them a name (screen readers) and a tooltip.
# Focus the input box without scrolling to it (the page opens at its top), and not on a phone (whose keyboard
# would cover the page).
PAGE_JS = """
() => {
  const name = () => {
    for (const [sel, label] of [["#dsvl-input .submit-button", "Send"], ["#dsvl-input .stop-button", "Stop"]])
      for (const b of document.querySelectorAll(sel)) { b.setAttribute("aria-label", label); b.title = label; }
  };
  name();
  new MutationObserver(name).observe(document.body, {childList: true, subtree: true});
  const box = document.querySelector("#dsvl-input textarea");
  if (box && window.matchMedia("(min-width: 641px)").matches) box.focus({preventScroll: true});
}
"""

DOWNLOAD_JS = """
(text) => {
  if (!text) return;
  const blob = new Blob([text], {type: "application/json"});
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = "dsvl-conversation-" + new Date().toISOString().slice(0, 19).replace(/[:T]/g, "-") + ".json";
  document.body.appendChild(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}
"""


def _examples() -> list[dict]:
    """Chatbot example cards (shown while the chat is empty); never cached or run at start-up."""
    a = lambda name: str(ASSETS / name)  # noqa: E731
    items = [
        {"text": "Describe this image in detail.", "files": [a("chelsea.png")], "display_text": "Describe a photo"},
        {"text": "What are the differences between Image 1 and Image 2?", "files": [a("coffee.png"), a("chelsea.png")],
         "display_text": "Compare two images"},
        {"text": "Read the text on this sign and tell me what it asks for.", "files": [a("sign.png")],
         "display_text": "Read the text in an image"},
        {"text": "What is happening in this picture, and roughly when was it taken?", "files": [a("rocket.jpg")],
         "display_text": "Explain a scene"},
        {"text": "Write a short poem about the sea, in four lines.", "files": [], "display_text": "Text only: a poem"},
    ]
    out = []
    for ex in items:
        if all(Path(f).is_file() for f in ex["files"]):
            if ex["files"]:
                ex["icon"] = ex["files"][0]
            out.append(ex)
    return out


# ---------------------------------------------------------------------------------------------------
# Rendering


def model_name(engine) -> str:
    """The name of the model actually loaded ("DeepSeek-VL 1.3B chat"), for the banner and the page title."""
    config = getattr(engine, "config", None)
    return getattr(config, "display_name", "DeepSeek-VL chat")


def real_model(engine) -> str:
    """The hub id of the published checkpoint of the loaded model's family (for the random-weights notice)."""
    from dsvl.config import CHAT_MODELS

    model_type = getattr(getattr(engine, "config", None), "model_type", None)
    return CHAT_MODELS.get(model_type, next(iter(CHAT_MODELS.values())))[1]


def banner_html(engine, settings: Settings) -> str:
    quant = str(getattr(engine, "quantization", "none") or "none")
    dtype = str(getattr(engine, "dtype", "")).replace("torch.", "")
    precision = dtype if quant in ("none", "") else f"{quant} weights · {dtype} compute"
    weights = human_size(int(getattr(engine, "weight_bytes", 0) or 0))
    model = settings.model
    if Path(model).expanduser().exists():  # a local checkpoint: its folder name (the full path in the tooltip)
        model = Path(model).expanduser().resolve().name
    chips = [
        ("model", model),
        ("precision", precision),
        ("device", str(getattr(engine, "device", "?"))),
        ("weights", weights),
        ("context", f"{int(getattr(engine, 'max_context_tokens', settings.max_context_tokens)):,} tokens"),
    ]
    if getattr(engine, "backend", None):  # a remote server: it knows its precision and device, we do not
        chips = [("model", engine.model), ("backend", engine.backend), chips[-1]]
    if hasattr(engine, "kv_budget_bytes"):  # KV memory in GB and in full-length conversations
        chips.append(("KV memory", f"{engine.kv_budget_bytes / 1e9:.1f} GB ≈ "
                                   f"{engine.kv_conversations:.1f} full conversations"))
    parts = [f'<div id="dsvl-banner"><span class="name">{html.escape(model_name(engine))}</span>']
    tips = {"model": settings.model}
    if quant not in ("none", ""):  # what the quantized mode costs, on hover
        tips["precision"] = QUANTIZATION_COSTS.get(quant.split("-g")[0], "precision")
    parts += [f'<span class="chip" title="{html.escape(tips.get(k, k))}">{html.escape(k)}: {html.escape(v)}</span>'
              for k, v in chips]
    parts.append("</div>")
    if getattr(engine, "is_random", False):
        parts.append(
            '<div id="dsvl-random">⚠️ RANDOM WEIGHTS: this is a test model, its answers are noise. For real '
            f"answers start the app with <code>--model {html.escape(real_model(engine))}</code>.</div>")
    return "".join(parts)


def context_html(conv: list[dict], max_context: int, image_tokens: int, live: str | None = None) -> str:
    """The small line under the chat: stats of the last answer, tokens used/left, dropped-turn notice."""
    n_images = history.count_images(conv)
    if live is not None:
        return f'<div id="dsvl-context">{html.escape(live)}</div>'
    last = next((t for t in reversed(conv) if t["role"] == "assistant" and t.get("stats")), None)
    if last is None:
        return (f'<div id="dsvl-context">Context: {max_context:,} tokens · each image takes {image_tokens} '
                f"tokens · {n_images} image{'s' if n_images != 1 else ''} in this chat</div>")
    s = last["stats"]
    bits = []
    if s.get("ttft_s") is not None:
        bits.append(f"first token {s['ttft_s']:.2f} s")
    if s.get("decode_tokens_per_s") is not None:
        bits.append(f"{s['decode_tokens_per_s']:.1f} tokens/s")
    bits.append(f"{int(s.get('new_tokens', 0)):,} tokens")
    if last["status"] == "stopped":
        bits.append("stopped")
    used = int(s.get("prompt_tokens", 0)) + int(s.get("new_tokens", 0))
    left = max(0, max_context - used)
    line = (" · ".join(bits) + f" &nbsp;|&nbsp; context: {used:,} of {max_context:,} tokens used, {left:,} left "
            f"({n_images} image{'s' if n_images != 1 else ''} × {image_tokens})")
    dropped = int(s.get("dropped_turns", 0) or 0)
    if dropped:
        line += (f'<br><span class="warn">⚠️ The {dropped} oldest turn{"s" if dropped != 1 else ""} no longer '
                 f"fit{'s' if dropped == 1 else ''} in the context and {'were' if dropped != 1 else 'was'} left out "
                 "of this answer. Start a new chat to talk about new images.</span>")
    return f'<div id="dsvl-context">{line}</div>'


# ---------------------------------------------------------------------------------------------------
# The app


def build_app(engine, settings: Settings | None = None, *, gpu=None) -> gr.Blocks:
    """The whole UI for one loaded engine. `gpu` optionally wraps the GPU work (spaces.GPU on ZeroGPU).
    Launch with `demo.launch(**launch_options(settings))`; the Runtime is at `demo.dsvl_runtime`."""
    settings = settings or Settings()
    examples = _examples()
    rt = Runtime(engine, settings, upload_root=Path(gr.utils.get_upload_folder()), gpu=gpu)
    max_ctx = rt.max_context_tokens
    gdef = settings.generation
    default_system = sysprompt.default_for(engine)

    def ctx(conv, live=None):
        return context_html(conv, max_ctx, rt.num_image_tokens, live)

    with gr.Blocks(title=model_name(engine), delete_cache=(1800, 6 * 3600), fill_height=True,
                   analytics_enabled=False) as demo:
        conv = gr.State([])  # canonical turns (history.py); per browser tab / API client
        pending = gr.State(None)  # the message being sent, put back into the box if it fails
        proposal = gr.State(None)  # a checked message: (conversation to answer, message to put back)

        gr.HTML(banner_html(engine, settings))
        chatbot = gr.Chatbot(
            elem_id="dsvl-chat", show_label=False, height="55vh", min_height=360, layout="bubble",
            buttons=["copy", "copy_all"], editable="user", feedback_options=None, examples=examples or None,
            placeholder=(f"**Ask about your pictures.** Attach, drop or paste up to {settings.max_images} images "
                         "per message, then ask. They are numbered Image 1, Image 2, … across the chat, so you "
                         "can refer to them."),
            group_consecutive_messages=False, latex_delimiters=LATEX, sanitize_html=True,
        )
        # The examples' cached copies are shared with identical uploads: never delete them.
        rt.files.protect(f["path"] for ex in (chatbot.examples or []) for f in [*ex.get("files", []), ex.get("icon")]
                         if isinstance(f, dict) and f.get("path"))
        context_md = gr.HTML(ctx([]), padding=False)
        textbox = gr.MultimodalTextbox(
            elem_id="dsvl-input", show_label=False, file_types=["image"], file_count="multiple",
            sources=["upload"], placeholder="Message DeepSeek-VL… (Enter to send, Shift+Enter for a new line)",
            submit_btn=True, stop_btn=False, autofocus=False, max_lines=12,
            max_plain_text_length=limits.MAX_MESSAGE_CHARS,
        )
        with gr.Row(elem_id="dsvl-tools"):
            retry_btn = gr.Button("Retry", size="sm", elem_id="dsvl-retry")
            undo_btn = gr.Button("Undo", size="sm", elem_id="dsvl-undo")
            clear_btn = gr.Button("New chat", size="sm", elem_id="dsvl-clear")
            export_btn = gr.Button("Export", size="sm", elem_id="dsvl-export")
            import_btn = gr.UploadButton("Import", size="sm", file_types=[".json"], type="filepath",
                                         elem_id="dsvl-import")
        with gr.Accordion("Generation settings (change them, then Retry to regenerate)", open=False,
                          elem_id="dsvl-settings"):
            with gr.Row():
                temperature = gr.Slider(0.0, 2.0, value=gdef.temperature, step=0.05, label="Temperature",
                                        info="0 = always the most likely word")
                top_p = gr.Slider(0.05, 1.0, value=gdef.top_p, step=0.01, label="Top-p")
                top_k = gr.Slider(0, 200, value=gdef.top_k, step=1, label="Top-k", info="0 = off")
            with gr.Row():
                max_new_tokens = gr.Slider(1, max(1, min(4096, max_ctx)), value=min(gdef.max_new_tokens, max_ctx),
                                           step=1, label="Max new tokens", elem_id="dsvl-max-new-tokens")
                repetition_penalty = gr.Slider(1.0, 2.0, value=gdef.repetition_penalty, step=0.01,
                                               label="Repetition penalty")
                seed = gr.Number(value=gdef.seed, precision=0, label="Seed", info="-1 = random")
            system_prompt = gr.Textbox(
                value=default_system or "", label="System prompt", lines=2, max_lines=8,
                max_length=sysprompt.MAX_CHARS, elem_id="dsvl-system-prompt",
                info="Written before the conversation (a persona, a language, a format). Default: the model's own; "
                     "empty: none. A change re-reads the whole chat on the next answer.")
        gr.Markdown(
            "<small>Conversations live in this browser tab only; the server keeps no log of them. Closing the tab "
            "deletes your uploads from the server.</small>", elem_id="dsvl-privacy")

        # Hidden parts of the API and of Export.
        with gr.Column(visible=False):
            api_history = gr.JSON(value=[], label="history")
            api_answer = gr.Textbox(label="answer")
            api_btn = gr.Button("chat")
            api_clear_btn = gr.Button("clear")
            export_data = gr.Textbox(label="export")

        sliders = [temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed]
        tools = [retry_btn, undo_btn, clear_btn, export_btn, import_btn]

        def busy():
            return [gr.update(interactive=False) for _ in tools]

        def idle():
            return [gr.update(interactive=True) for _ in tools]

        def staged(conv_, message):
            """Outputs of every 'stage' step: input locked with Stop showing, user turn shown."""
            box = gr.update(interactive=False, submit_btn=False, stop_btn=True)
            if message is not None:
                box = gr.update(value=None, interactive=False, submit_btn=False, stop_btn=True)
            return [box, [*history.chatbot_messages(conv_), waiting_bubble()], conv_, message,
                    ctx(conv_, "Waiting for the model…"), *busy()]

        stage_outputs = [textbox, chatbot, conv, pending, context_md, *tools]

        def user_message(message: Any, request: gr.Request) -> dict:
            """Check a {"text", "files"} message; returns the user turn. Raises gr.Error (see `refused`)."""
            if isinstance(message, str):
                message = {"text": message, "files": []}
            if not isinstance(message, dict):
                message = {}
            text = history.clean_text(message.get("text"))
            raw_files = message.get("files") or []
            files = [f if isinstance(f, str) else (f.get("path") if isinstance(f, dict) else getattr(f, "path", ""))
                     for f in (raw_files if isinstance(raw_files, list) else [raw_files])]
            if not text.strip() and not files:
                raise refused("Type a question or attach an image first.", "Nothing to send")
            try:
                limits.check_text(text)
            except limits.LimitError as exc:
                raise refused(str(exc), "Message too long") from None
            # Files only by identity: this server's uploads (and the examples' copies, which live among them).
            # Nothing else about any other path is looked at, so a refusal tells nothing about the server.
            if not all(limits.is_upload(f, rt.upload_root) for f in files):
                raise refused("An attached file is not an upload to this server; please attach it again.",
                              "Image refused")
            new = rt.files.track(request.session_hash, files)  # refused or not, deleted when the session ends
            if len(files) > settings.max_images:  # before looking at any of them
                raise refused(f"{len(files)} images attached; at most {settings.max_images} per message. "
                              "Remove some and send again.", "Image refused")
            try:
                check_files(files, max_images=settings.max_images, max_bytes=settings.max_file_size,
                            max_pixels=rt.max_image_pixels)
                rt.files.check_quota(request.session_hash, new)
            except UploadError as exc:
                if exc.path:  # a file that is not an image, too large, ...: deleted at once
                    rt.files.discard(request.session_hash, [exc.path])
                raise refused(str(exc), "Image refused") from None
            return history.user_turn(text, files)

        # -- check steps: each returns (conversation to answer, message to put back on failure) into
        # `proposal`, or refuses. A refusal is a notice only: its outputs are that invisible State, so the chat
        # and the input box stay as they are (Gradio marks a failed step's outputs with an error badge).
        def within_chat_limits(conv_):
            try:
                limits.check_conversation(conv_, max_images=settings.max_images,
                                          max_images_per_chat=settings.max_images_per_chat)
            except limits.LimitError as exc:
                raise refused(str(exc), "Too many images") from None
            return conv_

        def stage_message(message, conv_, request: gr.Request):
            turn = user_message(message, request)
            return within_chat_limits([*conv_, turn]), {"text": turn["text"], "files": turn["images"]}

        def stage_example(conv_, evt: gr.SelectData, request: gr.Request):
            # The card is looked up by its index among this server's examples: the event's value comes from
            # the client and may name any file.
            index = evt.index[0] if isinstance(evt.index, (list, tuple)) and evt.index else evt.index
            cards = chatbot.examples or []
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(cards):
                raise refused("There is no such example.", "Nothing to send")
            card = cards[index]
            value = {"text": card.get("text", ""),
                     "files": [f["path"] for f in card.get("files") or [] if isinstance(f, dict) and f.get("path")]}
            turn = user_message(value, request)
            return within_chat_limits([*conv_, turn]), {"text": turn["text"], "files": turn["images"]}

        def stage_retry(conv_):
            i = history.last_user_index(conv_)
            if i is None:
                raise refused("There is no question to answer again yet.", "Nothing to retry")
            return conv_[: i + 1], None

        def stage_edit(conv_, evt: gr.EditData):
            index = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
            i = history.turn_index_for_chatbot_index(conv_, int(index))
            if conv_[i]["role"] != "user":
                raise refused("Only your own messages can be edited.", "Not editable")
            turn = history.user_turn(rendering.typed_text(str(evt.value or "")), conv_[i]["images"])
            try:
                limits.check_text(turn["text"], "The edited message")
            except limits.LimitError as exc:
                raise refused(str(exc), "Message too long") from None
            if not turn["text"].strip() and not turn["images"]:
                raise refused("The edited message is empty.", "Nothing to send")
            return [*conv_[:i], turn], None

        def show_staged(proposal_):
            """The checked message shows at once, with the assistant's bubble saying what happens next."""
            conv_, message = proposal_
            return staged(conv_, message)

        # -- the queued, streaming step ---------------------------------------------------------------
        async def answer(conv_, t, p, k, n, r, s, sp, request: gr.Request):
            """Streams the reply. A failure is a notice, not an error of this step (which would cover the chat
            with an error badge): the chat goes back to the question, and `finish` puts it back in the box."""
            session = request.session_hash
            epoch = rt.epoch(session)
            shown = history.chatbot_messages(conv_)
            yield [*shown, working_bubble(conv_)], gr.skip(), ctx(conv_, "Reading your message…")
            try:
                params = generation_params(t, p, k, n, r, s, max_context_tokens=max_ctx, defaults=gdef)
                system = sysprompt.clean(sp, default_system)
                async with aclosing(rt.reply_async(session, conv_, params, system)) as replies:
                    async for reply in replies:
                        if rt.epoch(session) != epoch:
                            return  # "New chat" was pressed meanwhile: this reply belongs to nobody
                        new = [*conv_, reply.turn()]
                        if reply.status == "pending" and not reply.text:
                            continue  # the bubble keeps saying what happens until the first token
                        live = f"Writing… {reply.new_tokens} tokens" if reply.status == "pending" else None
                        yield history.chatbot_messages(new), new, ctx(new, live)
            except UserError as exc:
                log.info("refused by the model: %s", exc.title)
                gr.Warning(f"{exc.message} Your message is back in the box.", title=exc.title)
                yield shown, conv_, gr.skip()
            except Exception as exc:
                log.exception("generation failed")
                gr.Warning(f"{failure_message(exc)} Your message is back in the box.", title="Model error")
                yield shown, conv_, gr.skip()

        def waiting_bubble():
            """Between Send and the run: how many answers are ahead in the shared queue."""
            ahead = queue_ahead(demo)
            text = f"Waiting for my turn: {plural(ahead, 'answer')} ahead of yours…" if ahead else "Starting…"
            return {"role": "assistant", "content": f"*⏳ {text}*"}

        def working_bubble(conv_):
            turn = conv_[-1] if conv_ else {}
            n = len(turn.get("images", ())) if turn.get("role") == "user" else 0
            text = f"Looking at {plural(n, 'image')} and thinking…" if n else "Thinking…"
            return {"role": "assistant", "content": f"*💭 {text}*"}

        def finish(conv_, pending_, request: gr.Request):
            """After every chain (success, error or Stop): unlock the input. A user turn left without an
            answer means the request failed or was stopped before it began: take the turn back and, when
            it came from the input box, put it there again."""
            conv_ = list(conv_)
            box = gr.update(interactive=True, submit_btn=True, stop_btn=False)
            if conv_ and conv_[-1]["role"] == "user" and pending_ is not None:
                conv_.pop()
                box = gr.update(value=pending_, interactive=True, submit_btn=True, stop_btn=False)
            elif conv_ and conv_[-1]["role"] == "assistant" and conv_[-1]["status"] == "pending":
                # Stopped by Gradio's cancel before the reply's last update: take the engine's stats if in.
                stats = {**conv_[-1].get("stats", {}), **rt.last_stats.get(request.session_hash, {})}
                conv_[-1] = {**conv_[-1], "status": "stopped", "stats": stats}
            return [box, history.chatbot_messages(conv_), conv_, None, ctx(conv_), *idle()]

        answer_kwargs = dict(fn=answer, inputs=[conv, *sliders, system_prompt], outputs=[chatbot, conv, context_md],
                             concurrency_id=GPU, concurrency_limit=settings.concurrency, show_progress="minimal",
                             api_visibility="private")
        finish_kwargs = dict(fn=finish, inputs=[conv, pending], outputs=stage_outputs, queue=False,
                             api_visibility="private")
        private = dict(queue=False, api_visibility="private")
        # Queued (so that a gr.Error reaches the browser as a message) but never waiting behind the model.
        staging = dict(queue=True, concurrency_limit=None, api_visibility="private", show_progress="hidden")

        running = []
        for trigger, fn, inputs in [
            (textbox.submit, stage_message, [textbox, conv]),
            (chatbot.example_select, stage_example, [conv]),
            (retry_btn.click, stage_retry, [conv]),
            (chatbot.retry, stage_retry, [conv]),
            (chatbot.edit, stage_edit, [conv]),
        ]:
            ev = trigger(fn, inputs, [proposal], **staging)
            shown = ev.success(show_staged, [proposal], stage_outputs, show_progress="hidden", **private)
            gen = shown.success(**answer_kwargs)
            gen.then(**finish_kwargs)
            gen.failure(**finish_kwargs)  # Gradio 6.31's browser runs only .failure listeners after an error
            running.append(gen)

        def stop(request: gr.Request):
            rt.cancel(request.session_hash)

        textbox.stop(stop, None, None, cancels=running, **private)

        # -- undo / clear / export / import ---------------------------------------------------------
        def undo(conv_, box):
            i = history.last_user_index(conv_)
            if i is None:
                gr.Info("Nothing to undo.")
                return gr.skip(), gr.skip(), gr.skip(), gr.skip()
            turn, rest = conv_[i], conv_[:i]
            box_empty = not box or (not (box.get("text") or "").strip() and not box.get("files"))
            new_box = {"text": turn["text"], "files": turn["images"]} if box_empty else gr.skip()
            return new_box, history.chatbot_messages(rest), rest, ctx(rest)

        for trigger in (undo_btn.click, chatbot.undo):
            trigger(undo, [conv, textbox], [textbox, chatbot, conv, context_md], **private)

        def new_chat(request: gr.Request):
            rt.new_conversation(request.session_hash)
            return [], [], ctx([])

        for trigger in (clear_btn.click, chatbot.clear):
            trigger(new_chat, None, [chatbot, conv, context_md], **private)

        def do_export(conv_, sp):
            if not conv_:
                gr.Info("Nothing to export yet.")
                return ""
            size = limits.export_bytes(conv_)
            if size > limits.MAX_EXPORT_BYTES:
                raise refused(f"This chat's images add up to {human_size(size)}; Export takes at most "
                              f"{human_size(limits.MAX_EXPORT_BYTES)}.", "Export failed")
            try:
                doc = history.export_conversation(conv_, settings.model)
                doc["system_prompt"] = sysprompt.clean(sp, default_system)
                return json.dumps(doc, ensure_ascii=False)
            except UserError as exc:
                raise gr.Error(exc.message, title=exc.title) from None
            except OSError as exc:
                raise refused(f"An image of this chat is no longer on the server ({exc.filename}).",
                              "Export failed") from None

        export_btn.click(do_export, [conv, system_prompt], [export_data], **private).then(
            None, [export_data], None, js=DOWNLOAD_JS, **private)

        def do_import(path, request: gr.Request):
            session = request.session_hash
            if not path:
                return (gr.skip(),) * 4
            if not limits.is_upload(path, rt.upload_root):
                raise refused("The file to import is not an upload to this server.", "Import failed")
            try:
                raw = Path(path).read_bytes()
            except OSError:
                raise refused("The file to import is no longer on the server; please choose it again.",
                              "Import failed") from None
            finally:
                _delete_upload(Path(path), rt.upload_root)  # the JSON itself is not kept
            out_dir = rt.import_root / uuid.uuid4().hex
            try:
                turns, written = history.import_conversation(raw, out_dir, max_images=settings.max_images_per_chat,
                                                             max_image_bytes=settings.max_file_size)
                for p in written:
                    check_image(p, settings.max_file_size, rt.max_image_pixels)
                limits.check_conversation(turns, max_images=settings.max_images,
                                          max_images_per_chat=settings.max_images_per_chat)
                system = sysprompt.from_export(raw)
            except (history.ConversationFormatError, UploadError, limits.LimitError, UserError) as exc:
                shutil.rmtree(out_dir, ignore_errors=True)
                log.info("refused an import: %s", type(exc).__name__)
                gr.Warning(f"Could not import this file: {exc}", title="Import failed")  # the chat stays as it is
                return (gr.skip(),) * 4  # chatbot, conv, context, system prompt: all as they were
            except Exception as exc:  # a file this reader did not foresee: one log line, a plain message
                shutil.rmtree(out_dir, ignore_errors=True)
                log.warning("import refused: %s", type(exc).__name__)
                gr.Warning("Could not import this file: it is not a conversation exported by this app.",
                           title="Import failed")
                return (gr.skip(),) * 4  # chatbot, conv, context, system prompt: all as they were
            if written:
                rt.files.track_dir(session, out_dir)
            else:
                shutil.rmtree(out_dir, ignore_errors=True)
            rt.new_conversation(session)
            gr.Info(f"Imported {plural(len(turns), 'message')} and {plural(len(written), 'image')}.")
            return history.chatbot_messages(turns), turns, ctx(turns), gr.skip() if system is None else system

        # Gradio 6.31's UploadButton(type="filepath") opens an empty temp file in the upload folder for every
        # file it hands over and never deletes it; the uploaded file's own path is all do_import needs.
        import_btn._process_single_file = lambda f: NamedString(f.path)
        import_btn.upload(do_import, [import_btn], [chatbot, conv, context_md, system_prompt],
                          api_visibility="private")

        # -- API: /chat and /clear --------------------------------------------------------------------
        async def chat(message, temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed, history,
                       system_prompt, conv_, request: gr.Request):
            """Send one message ({"text": str, "files": [image, ...]}) and stream the answer.

            The conversation is kept per client session (a gradio_client Client), so successive calls
            continue it; /clear starts a new one. `history` (optional) replaces it: a list of messages in
            Gradio's typed or raw shape or the engine's shape; its files must be earlier uploads.
            `system_prompt` (optional, last so that older positional calls keep working) replaces the
            model's own; "" means none."""
            session = request.session_hash
            epoch = rt.epoch(session)
            if not session:
                raise refused("Call /chat through the queue (gradio_client does), not as a bare REST request.",
                              "No session")
            base = conv_ if history in (None, "", []) else _api_history(history, rt)
            turn = user_message(message, request)
            new = within_chat_limits([*base, turn])
            params = generation_params(temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed,
                                       max_context_tokens=max_ctx, defaults=gdef)
            try:
                system = sysprompt.clean(system_prompt, default_system)
            except UserError as exc:
                raise gr.Error(exc.message, title=exc.title) from None
            started = False
            try:
                async with aclosing(rt.reply_async(session, new, params, system)) as replies:
                    async for reply in replies:
                        if rt.epoch(session) != epoch:
                            return  # /clear meanwhile
                        started = True
                        yield reply.text, [*new, reply.turn()]
            except UserError as exc:
                if started:  # a failed call leaves the session's conversation as it was (no half turn)
                    yield gr.skip(), base
                raise refused(exc.message, exc.title) from None
            except Exception as exc:
                log.exception("generation failed")
                if started:
                    yield gr.skip(), base
                raise gr.Error(failure_message(exc), title="Model error") from None

        api_btn.click(chat, [textbox, *sliders, api_history, system_prompt, conv], [api_answer, conv], api_name="chat",
                      concurrency_id=GPU, concurrency_limit=settings.concurrency, api_visibility="public")

        def clear_api(request: gr.Request):
            """Start a new conversation for this client session (frees its caches on the server)."""
            rt.new_conversation(request.session_hash)
            return []

        api_clear_btn.click(clear_api, None, [conv], api_name="clear", queue=False, api_visibility="public")

        def on_unload(request: gr.Request):
            rt.end_session(request.session_hash)

        demo.unload(on_unload)

    # api_open=False: the REST routes (/gradio_api/run/...) refuse every queued handler, so each path to the
    # model waits in the one queue, under --concurrency and --max-queue.
    demo.queue(max_size=settings.max_queue, default_concurrency_limit=4, api_open=False)
    demo.dsvl_runtime = rt
    return demo


def refused(message: str, title: str) -> gr.Error:
    """The error for a user's mistake: a notice for them, one line (no traceback, no content) in the log."""
    log.info("refused a request: %s", title)
    return gr.Error(message, title=title, print_exception=False)


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def queue_ahead(demo: gr.Blocks) -> int:
    """Answers running or waiting in the model's queue (Gradio's queue, concurrency group "gpu")."""
    q = getattr(demo, "_queue", None)
    group = q.event_queue_per_concurrency_id.get(GPU) if q is not None else None
    return 0 if group is None else len(group.queue) + group.current_concurrency


def _delete_upload(path: Path, root: Path) -> None:
    """Delete an upload and the folder Gradio made for it, once empty."""
    path.unlink(missing_ok=True)
    try:
        if path.parent.resolve() != root.resolve():
            path.parent.rmdir()
    except OSError:
        pass  # not empty: another upload shares it


def _api_history(value: Any, rt: Runtime) -> list[dict]:
    try:
        limits.check_history_size(value)
        turns = history.normalize_history(value)
        limits.check_history_text(turns)
    except (history.ConversationFormatError, limits.LimitError) as exc:
        raise refused(f"history: {exc}", "Bad history") from None
    for t in turns:
        for p in t.get("images", ()):
            if not limits.is_upload(p, rt.upload_root):
                raise refused("history may only refer to files uploaded to this server.", "Bad history")
    return turns


def launch_options(settings: Settings, **overrides) -> dict:
    """Keyword arguments for `demo.launch` from the settings (tests pass a free port and
    prevent_thread_lock=True through `overrides`)."""
    opts = dict(
        server_name=settings.host, server_port=settings.port, share=settings.share, auth=settings.auth_pairs(),
        auth_message="DeepSeek-VL chat: please log in." if settings.auth else None,
        max_file_size=settings.max_file_size, css=CSS, theme=gr.themes.Soft(primary_hue="indigo"),
        footer_links=["api", "gradio", "settings"], run_history=False, ssr_mode=False, js=PAGE_JS,
        show_error=True, allowed_paths=[],
    )
    opts.update(overrides)
    return opts


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def start_in_background(engine, settings: Settings | None = None, **launch_overrides) -> tuple[gr.Blocks, str]:
    """Build and launch the app without blocking (tests, notebooks): returns (demo, url). Stop it with
    `demo.close()`. Binds 127.0.0.1 on a free port unless told otherwise."""
    settings = settings or Settings()
    demo = build_app(engine, settings)
    opts = launch_options(settings, server_name="127.0.0.1", server_port=free_port(), share=False,
                          prevent_thread_lock=True, quiet=True)
    opts.update(launch_overrides)
    demo.launch(**opts)
    return demo, f"http://{opts['server_name']}:{opts['server_port']}/"
