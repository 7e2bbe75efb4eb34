"""Chat tab: streamed replies from any loaded model, with Stop, Regenerate, Continue, Clear, an
editable system prompt, sampling presets and a saved, reopenable history.

The conversation lives in a per-session gr.State as plain {"role", "content": str} messages; the
Chatbot only displays it. Generation runs in a worker thread that holds the model's lock from start
to end (through the manager), so an abandoned page never leaves a model locked."""
import logging
import queue
import threading
import time
from typing import Any, Iterator

import gradio as gr

from backends.base import BackendError, SamplingParams
from webui.history import Conversation, new_conversation_id
from webui.presets import PRESET_FIELDS, preset_values

log = logging.getLogger(__name__)

TITLE = "Chat"
DEFAULT_PRESET = "Deterministic"
NO_MODEL = "No model is loaded: load one in the Models tab (or start with --model NAME)."
NOTHING_TO_ADD = "Continue: the model had nothing to add (it ends its reply there)."
# the sampling sliders' (minimum, maximum, step), in PRESET_FIELDS order (seed is a number box)
SLIDERS = {"temperature": (0.0, 2.0, 0.05), "top_p": (0.01, 1.0, 0.01), "top_k": (0, 200, 1),
           "min_p": (0.0, 0.99, 0.01), "repetition_penalty": (0.5, 2.0, 0.01), "max_new_tokens": (1, 4096, 1)}
UNREADABLE_PARAMS = "Its sampling settings could not be read: the ones above stay."


# -- pure helpers (unit-tested) -----------------------------------------------------------------
def text_of(content: Any) -> str:
    """Gradio 6 hands message contents as lists of typed parts ({"type": "text", "text": ...});
    older code and our own state use plain strings. Files and components carry no text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        if content.get("type", "text") == "text" and isinstance(content.get("text"), str):
            return content["text"]
        return ""
    if isinstance(content, (list, tuple)):
        return "".join(text_of(part) for part in content)
    text = getattr(content, "text", None)
    return text if isinstance(text, str) else ""


def normalize_messages(history: Any) -> list[dict]:
    """Any chat history (Chatbot value, gr.ChatMessage list, saved JSON) -> [{"role", "content": str}]."""
    out = []
    for message in history or []:
        role = message.get("role") if isinstance(message, dict) else getattr(message, "role", None)
        content = message.get("content") if isinstance(message, dict) else getattr(message, "content", None)
        if role not in ("system", "user", "assistant"):
            continue
        item = {"role": role, "content": text_of(content)}
        if isinstance(message, dict) and isinstance(message.get("stats"), dict):
            item["stats"] = message["stats"]
        out.append(item)
    return out


def saved_params(params: Any) -> list | None:
    """A saved conversation's sampling settings as the parameter widgets' values (PRESET_FIELDS order),
    or None when they are missing, invalid or outside the sliders (an old or hand-edited file)."""
    if not isinstance(params, dict):
        return None
    try:
        values = preset_values(params)
    except ValueError:
        return None
    for name, (low, high, _) in SLIDERS.items():
        if not low <= values[name] <= high:
            return None
    return [values[f] for f in PRESET_FIELDS]


def format_stats(stats: dict | None) -> str:
    """One line under a reply: token counts, speed, time to first token, why it ended."""
    if not stats:
        return ""
    parts = [f"{stats.get('generated_tokens', 0)} tokens",
             f"{stats.get('tokens_per_s', 0.0):.1f} tok/s",
             f"prompt {stats.get('prompt_tokens', 0)} tokens"]
    if stats.get("ttft_s") is not None:
        parts.append(f"first token {stats['ttft_s']:.2f} s")
    reason = stats.get("finish_reason")
    if reason:
        parts.append({"cancelled": "stopped", "length": "hit max tokens", "stop": "done",
                      "unloaded": "stopped: the model was unloaded"}.get(reason, reason))
    if stats.get("error"):
        parts.append("error")
    return " · ".join(parts)


def to_display(messages: list[dict]) -> list[dict]:
    """What the Chatbot shows: the messages, with each reply's stats in small text under it."""
    shown = []
    for m in messages:
        content = m["content"]
        if m["role"] == "assistant" and m.get("stats"):
            content = f"{content}\n\n<span class=\"gen-stats\">{format_stats(m['stats'])}</span>"
        if m["role"] != "system":
            shown.append({"role": m["role"], "content": content})
    return shown


def decode_rate(generated: int, started: float, first_token_at: float | None, now: float) -> float:
    """Tokens/s after the first token (time to first token is reported on its own, as llama.cpp
    and most benchmarks do); with a single token, the end-to-end rate."""
    if first_token_at is not None and generated >= 2 and now > first_token_at:
        return (generated - 1) / (now - first_token_at)
    return generated / (now - started) if now > started else 0.0


def new_state() -> dict:
    return {"id": new_conversation_id(), "messages": []}


def continue_prompt(rendered: str, partial_reply: str) -> str:
    """The template rendered with the partial reply, cut right after it: drops the end-of-turn
    marker so the model carries on with the same message."""
    for candidate in (partial_reply, partial_reply.rstrip(), partial_reply.strip()):
        if candidate:
            idx = rendered.rfind(candidate)
            if idx >= 0:
                return rendered[:idx + len(candidate)]
    raise BackendError("this model's chat template rewrites the reply, so it cannot be continued")


# -- the tab ----------------------------------------------------------------------------------
class ChatTab:
    def __init__(self, ctx):
        self.ctx = ctx
        self._stops: dict[str, threading.Event] = {}
        self._lock = threading.Lock()     # guards _stops and _deleted
        self._deleted: set[str] = set()   # conversations deleted while on screen: never saved again

    # models and presets
    def model_choices(self) -> list[str]:
        return self.ctx.manager.loaded_ids()

    def refresh_models(self, current: str | None):
        choices = self.model_choices()
        value = current if current in choices else (choices[0] if choices else None)
        return gr.update(choices=choices, value=value)

    def history_choices(self) -> list[tuple[str, str]]:
        return [(e.label, e.id) for e in self.ctx.history.list()]

    def _resolve_model(self, model_id: str | None) -> str:
        loaded = self.model_choices()
        if model_id in loaded:
            return model_id
        if not loaded:
            raise gr.Error(NO_MODEL)
        if model_id:
            gr.Warning(f"{model_id} is not loaded any more; using {loaded[0]}.")
        return loaded[0]

    @staticmethod
    def _params(temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens, seed) -> SamplingParams:
        try:
            return SamplingParams.from_dict(dict(
                temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens,
                seed=None if seed is None or int(seed) < 0 else int(seed))).validated()
        except (BackendError, TypeError, ValueError) as exc:
            raise gr.Error(f"Bad sampling parameters: {exc}") from None

    # stop signalling, per browser session
    def _begin(self, session: str) -> threading.Event:
        event = threading.Event()
        with self._lock:
            old = self._stops.get(session)
            if old is not None:
                old.set()
            self._stops[session] = event
        return event

    def _end(self, session: str, event: threading.Event) -> None:
        with self._lock:
            if self._stops.get(session) is event:
                del self._stops[session]

    def stop(self, request: gr.Request):
        with self._lock:
            event = self._stops.get(request.session_hash)
        if event is not None:
            event.set()

    # streaming core
    def _stream(self, model_id: str, params: SamplingParams, stop: threading.Event,
                messages: list[dict] | None = None, prompt: str | None = None) -> Iterator[list]:
        """Run the generation in a worker thread and yield batches of chunks as they arrive."""
        chunks: queue.Queue = queue.Queue()
        manager = self.ctx.manager

        def work():
            try:
                stream = (manager.chat(model_id, messages, params, stop) if prompt is None
                          else manager.generate(model_id, prompt, params, stop))
                for chunk in stream:
                    chunks.put(chunk)
            except BaseException as exc:  # handed to the consumer, shown in the page
                chunks.put(exc)
            finally:
                chunks.put(None)

        worker = threading.Thread(target=work, name=f"chat-{model_id}", daemon=True)
        worker.start()
        done = False
        try:
            while not done:
                batch = [chunks.get()]
                while True:  # coalesce what is already there: one page update per batch
                    try:
                        batch.append(chunks.get_nowait())
                    except queue.Empty:
                        break
                items = []
                for item in batch:
                    if item is None:
                        done = True
                    elif isinstance(item, BaseException):
                        raise item
                    else:
                        items.append(item)
                if items:
                    yield items
        finally:
            if not done:  # the page went away or failed: the worker ends within one token
                stop.set()

    def _generate_into(self, state: dict, model_id: str, params: SamplingParams, system_prompt: str,
                       request: gr.Request, continuing: bool = False, new_turn: bool = False):
        """Append (or extend, when continuing) the assistant reply in `state`, yielding as it grows.
        `new_turn`: the last user message was just sent; if nothing could be generated it is taken
        back too, so a refused prompt (say, too long) does not poison the conversation."""
        messages = state["messages"]
        chat = ([{"role": "system", "content": system_prompt}] if system_prompt.strip() else []) + \
            [{"role": m["role"], "content": m["content"]} for m in messages]
        prompt = None
        if continuing:
            backend = self.ctx.manager.get(model_id).backend
            prompt = continue_prompt(backend.render_chat(chat, add_generation_prompt=False), chat[-1]["content"])
            reply = messages[-1]
        else:
            reply = {"role": "assistant", "content": ""}
            messages.append(reply)
        base_text = reply["content"]
        base_stats = reply.get("stats")
        session = request.session_hash or "anonymous"
        stop = self._begin(session)
        started = time.perf_counter()
        first_token_at = None
        stats = {"model": model_id, "prompt_tokens": 0, "generated_tokens": 0, "tokens_per_s": 0.0,
                 "ttft_s": None, "finish_reason": None}
        text = ""
        try:
            for batch in self._stream(model_id, params, stop, None if continuing else chat, prompt):
                for chunk in batch:
                    text += chunk.text
                    stats["prompt_tokens"] = chunk.prompt_tokens
                    stats["generated_tokens"] = chunk.generated_tokens
                    if first_token_at is None and chunk.generated_tokens > 0:
                        first_token_at = time.perf_counter()
                    if chunk.finished:
                        stats["finish_reason"] = chunk.finish_reason
                now = time.perf_counter()
                stats["seconds"] = round(now - started, 3)
                stats["tokens_per_s"] = decode_rate(stats["generated_tokens"], started, first_token_at, now)
                stats["ttft_s"] = None if first_token_at is None else first_token_at - started
                reply["content"] = base_text + text
                reply["stats"] = dict(stats)
                yield
        except Exception as exc:  # the engine's problem is shown; the server keeps serving
            message = str(exc) if isinstance(exc, BackendError) else f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, BackendError):
                log.exception("generation with %s failed", model_id)
            stats["error"] = message
            reply["stats"] = dict(stats)
            gr.Warning(f"Generation failed: {message}")
        finally:
            self._end(session, stop)
        if stats["finish_reason"] is None and stop.is_set() and not stats.get("error"):
            stats["finish_reason"] = "cancelled"
            reply["stats"] = dict(stats)
        if not reply["content"] and not continuing and stats.get("error"):
            messages.remove(reply)  # nothing to keep; the reason goes to the stats box
            if new_turn and messages and messages[-1]["role"] == "user":
                messages.pop()
        if continuing and stats["generated_tokens"] == 0 and stats["finish_reason"] == "stop":
            reply["stats"] = base_stats  # the reply is as it was: keep what its own run measured
            yield {"note": NOTHING_TO_ADD}
            return
        yield {"error": stats.get("error")}

    def _save(self, state: dict, system_prompt: str, model_id: str, params: SamplingParams) -> bool:
        """False when the user deleted this conversation meanwhile (it stays deleted)."""
        if not state["messages"]:
            return True
        try:
            conv = Conversation(id=state["id"], title="", messages=state["messages"],
                                system_prompt=system_prompt, model=model_id,
                                params={f: getattr(params, f) for f in PRESET_FIELDS},
                                created=state.get("created", 0.0))
            with self._lock:  # the same lock as Delete's, so a save never follows a delete
                if conv.id in self._deleted:
                    return False
                self.ctx.history.save(conv)
            state["created"] = conv.created
        except OSError as exc:
            gr.Warning(f"Could not save the conversation: {exc}")
        return True

    def _run(self, state, model_id, system_prompt, params, request, continuing=False, new_turn=False):
        """Shared tail of send/regenerate/continue: stream into the page, then save."""
        system_prompt = system_prompt or ""
        outcome = None
        for outcome in self._generate_into(state, model_id, params, system_prompt, request, continuing, new_turn):
            last = state["messages"][-1] if state["messages"] else {}
            yield (to_display(state["messages"]), format_stats(last.get("stats")), state,
                   gr.update(), gr.update(value=model_id))
        if not self._save(state, system_prompt, model_id, params):  # deleted while it was answering
            yield [], "", new_state(), gr.update(choices=self.history_choices(), value=None), gr.update(value=model_id)
            return
        last = state["messages"][-1] if state["messages"] else {}
        line = format_stats(last.get("stats")) if last.get("role") == "assistant" else ""
        error, note = (outcome or {}).get("error"), (outcome or {}).get("note")
        if error:
            line = f"{line} · Generation failed: {error}" if line else f"Generation failed: {error}"
        if note:
            line = f"{line} · {note}" if line else note
        yield (to_display(state["messages"]), line, state,
               gr.update(choices=self.history_choices(), value=state["id"] if state["messages"] else None),
               gr.update(value=model_id))

    # event handlers: the order of arguments matches the inputs list in build()
    def send(self, message: str, model: str, system_prompt: str, temperature: float, top_p: float,
             top_k: int, min_p: float, repetition_penalty: float, max_new_tokens: int, seed: int,
             state: dict, request: gr.Request):
        params = self._params(temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens, seed)
        text = text_of(message).strip()
        if not text:
            raise gr.Error("Type a message first.")
        model = self._resolve_model(model)
        state = state or new_state()
        state["messages"].append({"role": "user", "content": text})
        yield (to_display(state["messages"]), "", state, gr.update(), gr.update(), "")
        for out in self._run(state, model, system_prompt, params, request, new_turn=True):
            yield (*out, gr.update())
        if not state["messages"] or state["messages"][-1]["role"] != "assistant":
            yield (*out, message)  # refused: the text goes back into the input box to be edited

    def regenerate(self, model: str, system_prompt: str, temperature: float, top_p: float,
                   top_k: int, min_p: float, repetition_penalty: float, max_new_tokens: int, seed: int,
                   state: dict, request: gr.Request):
        params = self._params(temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens, seed)
        model = self._resolve_model(model)
        state = state or new_state()
        messages = state["messages"]
        if messages and messages[-1]["role"] == "assistant":
            messages.pop()
        if not messages or messages[-1]["role"] != "user":
            raise gr.Error("Nothing to regenerate: send a message first.")
        yield (to_display(messages), "", state, gr.update(), gr.update())
        yield from self._run(state, model, system_prompt, params, request)

    def continue_reply(self, model: str, system_prompt: str, temperature: float, top_p: float,
                       top_k: int, min_p: float, repetition_penalty: float, max_new_tokens: int,
                       seed: int, state: dict, request: gr.Request):
        params = self._params(temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens, seed)
        model = self._resolve_model(model)
        state = state or new_state()
        messages = state["messages"]
        if not messages or messages[-1]["role"] != "assistant" or not messages[-1]["content"]:
            raise gr.Error("Nothing to continue: the last message must be a reply of the model.")
        try:
            yield from self._run(state, model, system_prompt, params, request, continuing=True)
        except BackendError as exc:
            raise gr.Error(str(exc)) from None

    def clear(self, request: gr.Request):
        self.stop(request)
        state = new_state()
        return [], "", state, gr.update(value=None)

    def open_conversation(self, conversation_id: str | None):
        if not conversation_id:
            raise gr.Error("Pick a conversation from the list first.")
        try:
            conv = self.ctx.history.load(conversation_id)
        except ValueError as exc:
            raise gr.Error(str(exc)) from None
        state = {"id": conv.id, "messages": normalize_messages(conv.messages), "created": conv.created}
        last = state["messages"][-1] if state["messages"] else {}
        line = format_stats(last.get("stats"))
        if conv.model in self.model_choices():
            model = gr.update(value=conv.model)
        else:  # say so: the next reply comes from another model than the earlier ones
            model = gr.update()
            note = (f"This conversation was with {conv.model}, which is not loaded: replies now come from the "
                    f"model picked above." if conv.model else "")
            line = " · ".join(part for part in (line, note) if part)
        # its own sampling settings come back too, so Regenerate and the next reply sample as before
        params = saved_params(conv.params)
        if params is None:
            params = [gr.update() for _ in PRESET_FIELDS]
            line = " · ".join(part for part in (line, UNREADABLE_PARAMS) if part)
        return (to_display(state["messages"]), line, state, conv.system_prompt, model, *params)

    def delete_conversation(self, conversation_id: str | None, state: dict, request: gr.Request):
        """Deleting the conversation on screen also clears the chat and ends a reply it is getting:
        otherwise the next message, or that reply's end, would save it again."""
        on_screen = bool(conversation_id) and (state or {}).get("id") == conversation_id
        if conversation_id:
            try:
                with self._lock:
                    self.ctx.history.delete(conversation_id)
                    if on_screen:
                        self._deleted.add(conversation_id)
            except ValueError as exc:
                raise gr.Error(str(exc)) from None
        listed = gr.update(choices=self.history_choices(), value=None)
        if not on_screen:
            return listed, gr.update(), gr.update(), state
        self.stop(request)
        return listed, [], "", new_state()

    def load_preset(self, name: str):
        try:
            values = self.ctx.presets.get(name)
        except ValueError as exc:
            raise gr.Error(str(exc)) from None
        return [values[f] for f in PRESET_FIELDS]

    def save_preset(self, name: str, temperature: float, top_p: float, top_k: int, min_p: float,
                    repetition_penalty: float, max_new_tokens: int, seed: int):
        values = dict(zip(PRESET_FIELDS, (temperature, top_p, top_k, min_p, repetition_penalty,
                                          max_new_tokens, seed)))
        try:
            path = self.ctx.presets.save_new(name, values)
        except ValueError as exc:
            gr.Warning(str(exc))
            return gr.update(), f"Not saved: {exc}"
        return (gr.update(choices=self.ctx.presets.names(), value=path.stem),
                f"Saved preset {path.stem} to {path}")

    # layout
    def build(self) -> None:
        ctx = self.ctx
        models = self.model_choices()
        preset_names = ctx.presets.names()
        start_preset = DEFAULT_PRESET if DEFAULT_PRESET in preset_names else (preset_names or [None])[0]
        start_values = ctx.presets.get(start_preset) if start_preset else {}
        state = gr.State(new_state)

        with gr.Row(equal_height=False):
            with gr.Column(scale=4):
                with gr.Row():
                    model = gr.Dropdown(models, value=models[0] if models else None, label="Model",
                                        elem_id="chat-model", scale=5, interactive=True,
                                        allow_custom_value=True)
                    refresh = gr.Button("↻ Refresh", elem_id="chat-model-refresh", scale=1, size="sm")
                chatbot = gr.Chatbot(elem_id="chatbot", label="Chat", height=480, buttons=["copy"],
                                     feedback_options=None, placeholder="Ask something to the loaded model.")
                stats = gr.Markdown("", elem_id="chat-stats")
                with gr.Row():
                    # one line to start: Gradio sends on Enter only then (Shift+Enter adds a line); from two lines
                    # up it is the other way round
                    message = gr.Textbox(placeholder="Type a message: Enter sends, Shift+Enter adds a line",
                                         show_label=False, lines=1, max_lines=10, elem_id="chat-input", scale=6,
                                         autofocus=True)
                    with gr.Column(scale=1, min_width=120):
                        send = gr.Button("Send", variant="primary", elem_id="chat-send")
                        stop = gr.Button("Stop", variant="stop", elem_id="chat-stop")
                with gr.Row():
                    regenerate = gr.Button("Regenerate", elem_id="chat-regenerate", size="sm")
                    cont = gr.Button("Continue", elem_id="chat-continue", size="sm")
                    clear = gr.Button("Clear", elem_id="chat-clear", size="sm")
                system = gr.Textbox("", label="System prompt", lines=2, elem_id="chat-system",
                                    placeholder="Optional instructions that steer every reply.")
            with gr.Column(scale=2, min_width=280):
                with gr.Accordion("Parameters", open=True, elem_id="chat-params"):
                    preset = gr.Dropdown(preset_names, value=start_preset, label="Preset", elem_id="preset-picker")
                    labels = {"temperature": "temperature (0 = greedy)", "top_k": "top_k (0 = off)"}
                    defaults = SamplingParams()
                    sliders = {name: gr.Slider(low, high, value=start_values.get(name, getattr(defaults, name)),
                                               step=step,
                                               label=labels.get(name, name),
                                               elem_id="param-" + name.replace("_", "-"))
                               for name, (low, high, step) in SLIDERS.items()}
                    seed = gr.Number(start_values.get("seed", -1), precision=0, label="seed (-1 = random)",
                                     elem_id="param-seed")
                    with gr.Row():
                        preset_name = gr.Textbox(label="Save as new preset", placeholder="My preset",
                                                 elem_id="preset-name", scale=3)
                        save_preset = gr.Button("Save", elem_id="preset-save", scale=1, size="sm")
                    preset_status = gr.Markdown("", elem_id="preset-status")
                with gr.Accordion("History", open=True, elem_id="chat-history"):
                    history = gr.Dropdown(self.history_choices(), value=None, label="Saved conversations",
                                          elem_id="history-list", interactive=True,
                                          allow_custom_value=True)
                    with gr.Row():
                        open_conv = gr.Button("Open", elem_id="history-open", size="sm")
                        delete_conv = gr.Button("Delete", elem_id="history-delete", size="sm")

        params = [*sliders.values(), seed]
        outputs = [chatbot, stats, state, history, model]
        send_inputs = [message, model, system, *params, state]
        gr.on([send.click, message.submit], self.send, send_inputs, [*outputs, message],
              api_name="chat", show_progress="hidden", concurrency_limit=None)
        regenerate.click(self.regenerate, [model, system, *params, state], outputs,
                         api_name="regenerate", show_progress="hidden", concurrency_limit=None)
        cont.click(self.continue_reply, [model, system, *params, state], outputs,
                   api_name="continue_reply", show_progress="hidden", concurrency_limit=None)
        stop.click(self.stop, None, None, api_name="stop", queue=False)
        clear.click(self.clear, None, [chatbot, stats, state, history], api_name="clear", queue=False)
        chatbot.clear(self.clear, None, [chatbot, stats, state, history], queue=False,
                      api_visibility="private")  # the Chatbot's own trash icon
        open_conv.click(self.open_conversation, history, [chatbot, stats, state, system, model, *params],
                        api_name="open_conversation")
        delete_conv.click(self.delete_conversation, [history, state], [history, chatbot, stats, state],
                          api_name="delete_conversation")
        preset.change(self.load_preset, preset, params, api_name="preset_values", show_progress="hidden")
        gr.on([save_preset.click, preset_name.submit], self.save_preset, [preset_name, *params],
              [preset, preset_status], api_name="save_preset")
        refresh.click(self.refresh_models, model, model, api_name="chat_models", queue=False)
        model.focus(self.refresh_models, model, model, queue=False, api_visibility="private")
        if ctx.blocks is not None:
            ctx.blocks.load(lambda current: (self.refresh_models(current),
                                             gr.update(choices=self.history_choices())),
                            model, [model, history], queue=False, api_visibility="private")


def build(ctx) -> None:
    ChatTab(ctx).build()
