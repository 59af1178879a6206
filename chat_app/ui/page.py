"""The chat page: a ``gr.Blocks`` wiring the Chatbot's events to ``ChatHandlers``.

Per browser tab, a ``gr.State`` holds the ``ChatSession`` (chat positions -> stored
message ids); a ``gr.BrowserState`` (encrypted in the browser's localStorage) holds the
client key, conversation id and thread head, so a reload finds the chat again. The user
name is Gradio's ``request.username`` when the operator turns logins on, else None.

Thumbs are the Chatbot's feedback buttons (``like``); the configured reasons are its
further feedback options, under each reply's flag menu (one pick rates and says why).
Editing uses ``editable="all"``
(``edit``), the retry icon and the Regenerate button regenerate (``retry``); after a
regenerate two buttons record which reply is better. A sidebar lists the user's chats
(``conversations.py``): search, reopen, rename, delete (after a confirmation). Gradio runs each event at most
``concurrency_limit`` at a time: call ``.queue(default_concurrency_limit=N)`` on the
returned Blocks to stream N replies at once (Gradio's own default is 1).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import gradio as gr

from feedback_store import FeedbackStore

from .handlers import ChatHandlers
from .markup import display_text
from .options import ChatPageSettings
from .session import ChatSession
from .view import PageUpdate

__all__ = ["PAGE_CSS", "ChatPageSettings", "build_chat_page"]

BROWSER_STORAGE_KEY = "feedback-chat-session"
LIST_LABEL = "Chats, newest first"
# Pass as ``css=`` where the page is served (``mount_gradio_app`` or ``launch``). The
# theme's orange primary button has white text at a 3.6:1 contrast in dark mode (axe:
# serious); a darker orange gives 5.2:1, light or dark.
PAGE_CSS = """
#send { background: #c2410c !important; border-color: #c2410c !important;
         color: #ffffff !important; }
"""
# Runs in the browser once the page loads: Esc stops a streaming reply (Enter sends and
# Shift+Enter adds a line are the message box's own keys); on a narrow screen (a phone)
# the chat list starts folded away, as it would cover the chat.
KEYS_JS = """() => {
  document.addEventListener('keydown', (event) => {
    if (event.key !== 'Escape') return;
    const stop = document.querySelector('#stop');
    if (stop && !stop.disabled) stop.click();
  });
  if (window.innerWidth >= 768) return;
  let tries = 0;
  const fold = () => {
    const bar = document.querySelector('#sidebar');
    if (bar && bar.classList.contains('open')) {
      bar.querySelector('.toggle-button')?.click();
    } else if (tries++ < 40) {
      setTimeout(fold, 50);
    }
  };
  fold();
}"""


def build_chat_page(*, store: FeedbackStore, engine: Any, settings: ChatPageSettings,
                    router: Any | None = None) -> gr.Blocks:
    """Build the chat page over ``store`` and ``engine`` (see the module docstring);
    ``router`` splits conversations between the active version and a canary."""
    handlers = ChatHandlers(store=store, engine=engine, settings=settings, router=router)
    with gr.Blocks(title=settings.title, analytics_enabled=False) as demo:
        with gr.Sidebar(label="Your chats", open=True, elem_id="sidebar", width=290):
            search = gr.Textbox(label="Search your chats", placeholder="Search your chats",
                                show_label=False,
                                elem_id="chat-search", max_lines=1)
            chat_list = gr.Radio(choices=[], label=LIST_LABEL, elem_id="chat-list")
            title_box = gr.Textbox(label="New name for this chat",
                                   placeholder="A new name for this chat", show_label=False,
                                   elem_id="chat-title", max_lines=1)
            rename_btn = gr.Button("Rename this chat", size="sm", elem_id="rename-chat")
            delete_btn = gr.Button("Delete this chat", size="sm", variant="stop",
                                   elem_id="delete-chat")
            with gr.Row(visible=False, elem_id="confirm-delete") as confirm_row:
                gr.Markdown("Delete it for good, from training and exports too?")
                confirm_btn = gr.Button("Yes, delete", size="sm", variant="stop",
                                        elem_id="confirm-delete-yes")
                cancel_btn = gr.Button("Keep it", size="sm", elem_id="confirm-delete-no")
            forget_btn = gr.Button("Delete all my data", size="sm", elem_id="forget-me")
            with gr.Row(visible=False, elem_id="confirm-forget") as forget_row:
                gr.Markdown("Delete every chat of yours and all your ratings, for good?")
                forget_yes = gr.Button("Yes, delete everything", size="sm", variant="stop",
                                       elem_id="confirm-forget-yes")
                forget_no = gr.Button("Keep it", size="sm", elem_id="confirm-forget-no")
        gr.Markdown(f"## {display_text(settings.title)}")
        model_line = gr.Markdown(elem_id="model-line")
        chatbot = gr.Chatbot(
            label="Chat", elem_id="chat", height=460, editable="all",
            feedback_options=("Like", "Dislike", *settings.up_reasons,
                              *settings.down_reasons),
            buttons=["copy", "copy_all"],
            sanitize_html=True, placeholder="Say hello to start a chat.",
        )
        notice = gr.Markdown(elem_id="notice")
        update_line = gr.Markdown(elem_id="update-notice")
        with gr.Row(equal_height=True):
            message = gr.Textbox(
                label="Your message", placeholder=f"Your message (up to {settings.max_message_chars} characters); "
                            "Enter sends", show_label=False, scale=6, lines=1, max_lines=8,
                elem_id="message", autofocus=True,
            )
            send_btn = gr.Button("Send", variant="primary", scale=1, elem_id="send")
            stop_btn = gr.Button("Stop", scale=1, interactive=False, elem_id="stop")
        with gr.Row():
            regen_btn = gr.Button("Regenerate last reply", size="sm", elem_id="regenerate")
            new_btn = gr.Button("New chat", size="sm", elem_id="new-chat")
            compare_btn = gr.Button("Compare with another version", size="sm",
                                    elem_id="compare")
        with gr.Group(visible=False, elem_id="side-by-side") as side_group:
            gr.Markdown("Two replies to your last message, from two versions of the model. "
                        "Which is better?")
            with gr.Row(equal_height=True):
                side_a = gr.Markdown(elem_id="side-a", container=True)
                side_b = gr.Markdown(elem_id="side-b", container=True)
            with gr.Row():
                pick_a = gr.Button("A is better", size="sm", elem_id="pick-a")
                pick_b = gr.Button("B is better", size="sm", elem_id="pick-b")
                pick_none = gr.Button("Both are bad", size="sm", elem_id="pick-both-bad")
        with gr.Row(visible=False, elem_id="choice") as choice_row:
            gr.Markdown("Which reply is better?")
            prev_better = gr.Button("Previous was better", size="sm", elem_id="prefer-previous")
            new_better = gr.Button("New is better", size="sm", elem_id="prefer-new")
        with gr.Row(equal_height=True):
            comment = gr.Textbox(
                label="Comment on a reply", placeholder="A comment on the last reply (click a reply to pick another)",
                show_label=False, scale=6, elem_id="comment",
            )
            comment_btn = gr.Button("Add comment", size="sm", scale=1, elem_id="add-comment")
        with gr.Accordion("System prompt", open=False, visible=settings.show_system_prompt):
            system_prompt = gr.Textbox(
                label="System prompt", value=settings.default_system_prompt, show_label=False,
                lines=2,
                placeholder="Instructions for the model; fixed once the chat has started",
                elem_id="system-prompt",
            )
        state = gr.State(None)
        memory = gr.BrowserState({}, storage_key=BROWSER_STORAGE_KEY,
                                 secret=settings.browser_state_secret)

        outputs = [state, chatbot, model_line, notice, message, comment, choice_row,
                   system_prompt, stop_btn, memory]
        CHOICE, STOP = outputs.index(choice_row), outputs.index(stop_btn)  # noqa: N806

        def render(session: ChatSession, update: PageUpdate) -> tuple[Any, ...]:
            if update.notice is not None and update.notice.is_error:
                gr.Warning(update.notice.text)
            text = ""
            if update.notice is not None:
                mark = "⚠️" if update.notice.is_error else "✓"
                text = f"{mark} {display_text(update.notice.text)}"
            keep = gr.skip()
            return (
                session,
                gr.Chatbot(value=update.history, feedback_value=update.feedback),
                update.model_line,
                text,
                keep if update.message_box is None else update.message_box,
                keep if update.comment_box is None else update.comment_box,
                gr.Row(visible=update.choice_visible),
                gr.Textbox(interactive=not update.system_prompt_locked)
                if update.system_prompt is None else
                gr.Textbox(value=update.system_prompt, interactive=not update.system_prompt_locked),
                gr.Button(interactive=update.generating),
                update.memory,
            )

        def session_of(state_value: Any, request: gr.Request | None) -> ChatSession:
            user = _username(request)
            if isinstance(state_value, ChatSession):
                if user is not None:
                    state_value.user_id = user
                return state_value
            return handlers.load(None, user_id=user)[0]

        def one(step: Callable[..., PageUpdate]) -> Callable[..., tuple[Any, ...]]:
            def run(state_value: Any, *args: Any, request: gr.Request) -> tuple[Any, ...]:
                session = session_of(state_value, request)
                return render(session, step(session, *args))
            return run

        def streamed(step: Callable[..., Iterator[PageUpdate]]
                     ) -> Callable[..., Iterator[tuple[Any, ...]]]:
            def run(state_value: Any, *args: Any, request: gr.Request
                    ) -> Iterator[tuple[Any, ...]]:
                session = session_of(state_value, request)
                for update in step(session, *args):
                    out = list(render(session, update))
                    if not update.generating:  # the end: after_stream settles these two
                        out[STOP] = out[CHOICE] = gr.skip()
                    yield tuple(out)
            return run

        def after_stream(state_value: Any) -> tuple[Any, Any]:
            """Once a streaming event has completed: disable Stop, show the "which is
            better" buttons if a regenerate is waiting for an answer. (Gradio re-sends a
            stream's last output when the event completes, so anything the last output
            set could flip back after a quick click; these two are set only here.)"""
            session = state_value if isinstance(state_value, ChatSession) else None
            live = session is not None and session.generating
            waiting = session is not None and session.pending_choice is not None
            return gr.Button(interactive=live), gr.Row(visible=waiting and not live)

        def on_load(remembered: Any, request: gr.Request) -> tuple[Any, ...]:
            session, update = handlers.load(remembered, user_id=_username(request))
            return render(session, update)

        def on_send(state_value: Any, text: str, prompt: str, request: gr.Request
                    ) -> Iterator[tuple[Any, ...]]:
            yield from streamed(handlers.send)(state_value, text, prompt, request=request)

        def on_retry(state_value: Any, data: gr.RetryData, request: gr.Request
                     ) -> Iterator[tuple[Any, ...]]:
            index = data.index if isinstance(data.index, int) else None
            position = index + 1 if index is not None else None
            yield from streamed(handlers.regenerate)(state_value, position, request=request)

        def on_regenerate(state_value: Any, request: gr.Request) -> Iterator[tuple[Any, ...]]:
            yield from streamed(handlers.regenerate)(state_value, request=request)

        def on_edit(state_value: Any, data: gr.EditData, request: gr.Request
                    ) -> Iterator[tuple[Any, ...]]:
            yield from streamed(handlers.edit)(state_value, data.index, data.value,
                                               request=request)

        def on_like(state_value: Any, data: gr.LikeData, request: gr.Request) -> tuple[Any, ...]:
            return one(handlers.rate)(state_value, data.index, data.liked, request=request)

        def on_select(state_value: Any, data: gr.SelectData, request: gr.Request
                      ) -> tuple[Any, ...]:
            return one(handlers.select)(state_value, data.index, request=request)

        def on_comment(state_value: Any, text: str, request: gr.Request) -> tuple[Any, ...]:
            return one(handlers.comment)(state_value, text, request=request)

        def on_prefer(prefer: str) -> Callable[..., tuple[Any, ...]]:
            def run(state_value: Any, request: gr.Request) -> tuple[Any, ...]:
                return one(handlers.choose)(state_value, prefer, request=request)
            return run

        def on_stop(state_value: Any, request: gr.Request) -> tuple[Any, ...]:
            return one(handlers.stop)(state_value, request=request)

        def on_new_chat(state_value: Any, request: gr.Request) -> tuple[Any, ...]:
            return one(handlers.new_chat)(state_value, request=request)

        def side_update(state_value: Any) -> tuple[Any, Any, Any]:
            """The side-by-side panel: shown with its two replies while a pick is awaited."""
            texts = state_value.side_by_side_texts if isinstance(state_value, ChatSession) \
                else None
            if texts is None:
                return gr.Group(visible=False), "", ""
            return (gr.Group(visible=True), f"**A**\n\n{display_text(texts[0])}",
                    f"**B**\n\n{display_text(texts[1])}")

        def on_compare(state_value: Any, request: gr.Request) -> tuple[Any, ...]:
            return one(handlers.compare)(state_value, request=request)

        def on_canary_compare(state_value: Any, request: gr.Request) -> tuple[Any, ...]:
            session = session_of(state_value, request)
            update = handlers.canary_compare(session)
            if update is None:
                return tuple(gr.skip() for _ in outputs)
            return render(session, update)

        def on_pick(pick: str) -> Callable[..., tuple[Any, ...]]:
            def run(state_value: Any, request: gr.Request) -> tuple[Any, ...]:
                return one(handlers.pick_side)(state_value, pick, request=request)
            return run

        def list_update(state_value: Any, search_text: Any) -> tuple[Any, Any, Any]:
            """The conversation list for the tab's owner, the open chat selected; and, once
            per version, the line saying the model was updated with the user's feedback."""
            if not isinstance(state_value, ChatSession):
                return gr.Radio(choices=[], value=None), gr.skip(), gr.skip()
            items, problem = handlers.conversations(state_value, search_text)
            ids = {c.id for c in items}
            current = state_value.conversation_id
            update = handlers.update_notice(state_value)
            return (gr.Radio(choices=[(c.title, c.id) for c in items],
                             value=current if current in ids else None,
                             label=f"⚠️ {problem}" if problem else LIST_LABEL),
                    gr.skip() if update is None else update,
                    state_value.memory())

        def on_open(state_value: Any, chosen: Any, request: gr.Request) -> tuple[Any, ...]:
            return one(handlers.open_conversation)(state_value, chosen, request=request)

        def on_rename(state_value: Any, title: Any, request: gr.Request) -> tuple[Any, ...]:
            return one(handlers.rename_conversation)(state_value, title, request=request)

        def on_delete(state_value: Any, request: gr.Request) -> tuple[Any, ...]:
            return one(handlers.delete_conversation)(state_value, request=request)

        def on_forget(state_value: Any, request: gr.Request) -> tuple[Any, ...]:
            return one(handlers.forget_me)(state_value, request=request)

        quick = dict(outputs=outputs, show_progress="hidden", concurrency_limit=None)
        stream = dict(outputs=outputs, show_progress="hidden")
        then = dict(fn=after_stream, inputs=[state], outputs=[stop_btn, choice_row],
                    show_progress="hidden", api_visibility="private", concurrency_limit=None)
        demo.load(None, None, None, js=KEYS_JS, api_visibility="private")
        listed = dict(fn=list_update, inputs=[state, search],
                      outputs=[chat_list, update_line, memory],
                      show_progress="hidden", api_visibility="private", concurrency_limit=None)
        demo.load(on_load, [memory], outputs, show_progress="hidden",
                  api_visibility="private").then(**listed)
        sided = dict(fn=side_update, inputs=[state], outputs=[side_group, side_a, side_b],
                     show_progress="hidden", api_visibility="private", concurrency_limit=None)
        canary = dict(fn=on_canary_compare, inputs=[state], outputs=outputs,
                      show_progress="minimal", api_visibility="private")
        send_btn.click(on_send, [state, message, system_prompt], api_name="send",
                       **stream).then(**then).then(**listed).then(**canary).then(**sided)
        message.submit(on_send, [state, message, system_prompt], api_visibility="private",
                       **stream).then(**then).then(**listed).then(**canary).then(**sided)
        regen_btn.click(on_regenerate, [state], api_name="regenerate", **stream).then(
            **then).then(**sided)
        chatbot.retry(on_retry, [state], api_visibility="private", **stream).then(**then)
        chatbot.edit(on_edit, [state], api_visibility="private", **stream).then(**then)
        search.change(**listed)
        compare_btn.click(on_compare, [state], api_name="compare", outputs=outputs,
                          show_progress="minimal").then(**sided)
        for button, pick in ((pick_a, "a"), (pick_b, "b"), (pick_none, "both_bad")):
            button.click(on_pick(pick), [state], api_name=f"pick_{pick}", **quick).then(**sided)
        chat_list.input(on_open, [state, chat_list], api_visibility="private",
                        **quick).then(**listed).then(**sided)
        rename_btn.click(on_rename, [state, title_box], api_name="rename_chat",
                         **quick).then(**listed)
        title_box.submit(on_rename, [state, title_box], api_visibility="private",
                         **quick).then(**listed)
        delete_btn.click(lambda: gr.Row(visible=True), None, [confirm_row],
                         show_progress="hidden", api_visibility="private")
        cancel_btn.click(lambda: gr.Row(visible=False), None, [confirm_row],
                         show_progress="hidden", api_visibility="private")
        confirm_btn.click(on_delete, [state], api_name="delete_chat", **quick).then(
            lambda: gr.Row(visible=False), None, [confirm_row], show_progress="hidden",
            api_visibility="private").then(**listed)
        forget_btn.click(lambda: gr.Row(visible=True), None, [forget_row],
                         show_progress="hidden", api_visibility="private")
        forget_no.click(lambda: gr.Row(visible=False), None, [forget_row],
                        show_progress="hidden", api_visibility="private")
        forget_yes.click(on_forget, [state], api_name="forget_me", **quick).then(
            lambda: gr.Row(visible=False), None, [forget_row], show_progress="hidden",
            api_visibility="private").then(**listed)
        chatbot.like(on_like, [state], api_visibility="private", **quick)
        chatbot.select(on_select, [state], api_visibility="private", **quick)
        comment_btn.click(on_comment, [state, comment], api_name="comment", **quick)
        comment.submit(on_comment, [state, comment], api_visibility="private", **quick)
        prev_better.click(on_prefer("previous"), [state], api_name="prefer_previous", **quick)
        new_better.click(on_prefer("new"), [state], api_name="prefer_new", **quick)
        stop_btn.click(on_stop, [state], api_name="stop", **quick)
        new_btn.click(on_new_chat, [state], api_name="new_chat", **quick).then(
            **listed).then(**sided)
        chatbot.clear(on_new_chat, [state], api_visibility="private", **quick)
    return demo


def _username(request: gr.Request | None) -> str | None:
    name = getattr(request, "username", None) if request is not None else None
    return name if isinstance(name, str) and name.strip() else None
