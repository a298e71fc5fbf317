// The messages on screen: questions, answers (with their model and timings), errors with
// a retry button, and the Edit and Regenerate buttons of the last turn.
//
// An entry's `.msg` holds only the message's own text, so that what a test or a screen
// reader reads there is the message; buttons and notes sit beside it in the entry.

import { StreamingMarkdown, copyCode, renderMarkdown } from "./markdown.js";

function element(tag, className, text) {
  const node = document.createElement(tag);
  node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function button(label, className, run) {
  const control = element("button", className, label);
  control.type = "button";
  control.addEventListener("click", run);
  return control;
}

export class Log {
  constructor(root) {
    this.root = root;
    this.pinned = true;  // follow the answer as it grows, unless the reader scrolled up
    root.addEventListener("scroll", () => {
      this.pinned = root.scrollHeight - root.scrollTop - root.clientHeight < 48;
    });
    root.addEventListener("click", copyCode);
  }

  follow() {
    if (this.pinned) this.root.scrollTop = this.root.scrollHeight;
  }

  clear() {
    this.root.replaceChildren();
    this.pinned = true;
  }

  add(entry) {
    this.root.append(entry);
    this.follow();
    return entry;
  }

  /** A question; with a ``queuedNote`` it waits to be sent, and says when it will be. */
  question(text, queuedNote = "") {
    const entry = element("div", "entry user-entry");
    entry.append(element("div", "msg user", text));
    if (queuedNote) {
      entry.classList.add("queued");
      entry.append(element("span", "badge", "Queued: sent " + queuedNote));
    }
    return this.add(entry);
  }

  removeQueued() {
    for (const entry of this.root.querySelectorAll(".user-entry.queued")) entry.remove();
  }

  /** An answer that streams: returns its entry and the renderer to append text to. */
  streamingAnswer(model, text) {
    const entry = this.add(element("div", "entry assistant-entry"));
    const body = element("div", "msg assistant");
    entry.append(body, element("div", "meta", model || ""));
    const markdown = new StreamingMarkdown(body, () => this.follow());
    if (text) markdown.append(text);
    return { entry, markdown };
  }

  /** A message read back from the conversation. */
  stored(message) {
    if (message.role === "user") this.question(message.content);
    else if (message.role === "assistant" && message.content) {
      const entry = this.add(element("div", "entry assistant-entry"));
      const body = element("div", "msg assistant");
      entry.append(body, element("div", "meta", message.partial ? "stopped" : ""));
      renderMarkdown(body, message.content);
      if (message.partial) body.classList.add("partial");
      this.follow();
    }
  }

  error(message, retry) {
    const entry = element("div", "entry error-entry");
    entry.setAttribute("role", "alert");
    entry.append(element("p", "msg error", "Error: " + message));
    if (retry) {
      entry.append(button("Retry", "retry", () => {
        entry.remove();
        retry();
      }));
    }
    return this.add(entry);
  }

  /** Edit and Regenerate on the last question and answer; none while ``idle`` is false. */
  setActions(idle, { edit, regenerate }) {
    for (const old of this.root.querySelectorAll(".actions")) old.remove();
    if (!idle) return;
    const lastQuestion = [...this.root.querySelectorAll(".user-entry:not(.queued)")].at(-1);
    const lastAnswer = [...this.root.querySelectorAll(".assistant-entry")].at(-1);
    if (!lastQuestion) return;
    const text = lastQuestion.querySelector(".msg").textContent;
    lastQuestion.append(actions(button("Edit", "", () => edit(text)), "Edit and resend the last message"));
    if (lastAnswer) lastAnswer.append(actions(button("Regenerate", "", () => regenerate(text)), "Ask the last message again"));
  }
}

function actions(control, description) {
  control.title = description;
  const holder = element("div", "actions");
  holder.append(control);
  return holder;
}
