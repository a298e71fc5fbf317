// The conversation list: open (a link to #c=ID), rename, delete, new chat.
//
// The gateway titles a conversation from its first message and has no rename: a title the
// user gives is kept in this browser's localStorage and shown instead.

const TITLES = "chatgate.titles";

function storedTitles() {
  try {
    return JSON.parse(localStorage.getItem(TITLES) || "{}");
  } catch {
    return {};
  }
}

export function conversationLink(id) {
  return "#c=" + encodeURIComponent(id);
}

export class Sidebar {
  /** ``onDelete(id)`` runs after the gateway deleted conversation ``id``. */
  constructor(api, { list, toggle, panel, onDelete }) {
    this.api = api;
    this.list = list;
    this.toggle = toggle;
    this.panel = panel;
    this.onDelete = onDelete;
    this.current = null;
    this.conversations = [];
    toggle.addEventListener("click", () => this.setOpen(toggle.getAttribute("aria-expanded") !== "true"));
    list.addEventListener("click", (event) => this.clicked(event));
    panel.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && panel.classList.contains("open")) {
        event.stopPropagation();
        this.setOpen(false);
        toggle.focus();
      }
    });
  }

  setOpen(open) {
    this.toggle.setAttribute("aria-expanded", String(open));
    this.panel.classList.toggle("open", open);
  }

  title(conversation) {
    return storedTitles()[conversation.id] || conversation.title || "Untitled";
  }

  async refresh() {
    const { conversations } = await this.api.json("conversations");
    conversations.sort((a, b) => (b.updated_at || 0) - (a.updated_at || 0));
    this.conversations = conversations;
    this.render();
  }

  info(id) {
    return this.conversations.find((c) => c.id === id);
  }

  select(id) {
    this.current = id;
    for (const link of this.list.querySelectorAll("a")) {
      if (link.dataset.id === id) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
  }

  render() {
    const items = this.conversations.map((conversation) => {
      const item = document.createElement("li");
      item.dataset.id = conversation.id;
      const link = document.createElement("a");
      link.href = conversationLink(conversation.id);
      link.dataset.id = conversation.id;
      link.textContent = this.title(conversation);
      if (conversation.id === this.current) link.setAttribute("aria-current", "page");
      item.append(link, button("rename", "Rename", link.textContent), button("delete", "Delete", link.textContent));
      return item;
    });
    this.list.replaceChildren(...items);
  }

  async clicked(event) {
    const target = event.target.closest("button, a");
    if (!target) return;
    if (target.tagName === "A") {
      if (matchMedia("(max-width: 760px)").matches) this.setOpen(false);
      return;
    }
    const item = target.closest("li");
    const id = item.dataset.id;
    if (target.classList.contains("rename")) this.rename(item, id);
    else if (target.classList.contains("delete")) await this.remove(target, id);
  }

  rename(item, id) {
    const link = item.querySelector("a");
    const field = document.createElement("input");
    field.value = link.textContent;
    field.setAttribute("aria-label", "New title");
    field.className = "rename-field";
    let done = false;
    const finish = (save) => {
      if (done) return;
      done = true;
      const titles = storedTitles();
      const title = field.value.trim();
      if (save && title) titles[id] = title;
      else if (save) delete titles[id];  // an empty title goes back to the gateway's
      localStorage.setItem(TITLES, JSON.stringify(titles));
      this.render();
      this.list.querySelector(`li[data-id="${CSS.escape(id)}"] a`)?.focus();
    };
    field.addEventListener("keydown", (event) => {
      if (event.key === "Enter") finish(true);
      else if (event.key === "Escape") {
        event.stopPropagation();
        finish(false);
      }
    });
    field.addEventListener("blur", () => finish(true));
    link.replaceWith(field);
    field.focus();
    field.select();
  }

  /** The first click asks, the second deletes; leaving the button forgets the question. */
  async remove(control, id) {
    if (control.dataset.confirm !== "yes") {
      control.dataset.confirm = "yes";
      control.textContent = "Delete?";
      control.setAttribute("aria-label", `Confirm: delete ${control.dataset.title}`);
      control.addEventListener("blur", () => {
        delete control.dataset.confirm;
        control.textContent = "Delete";
        control.setAttribute("aria-label", `Delete ${control.dataset.title}`);
      }, { once: true });
      return;
    }
    await this.api.fetch("conversations/" + encodeURIComponent(id), { method: "DELETE" });
    const titles = storedTitles();
    delete titles[id];
    localStorage.setItem(TITLES, JSON.stringify(titles));
    this.conversations = this.conversations.filter((c) => c.id !== id);
    this.render();
    this.onDelete(id);
  }
}

function button(kind, label, title) {
  const control = document.createElement("button");
  control.type = "button";
  control.className = kind;
  control.textContent = label;
  control.dataset.title = title;
  control.setAttribute("aria-label", `${label} ${title}`);
  return control;
}
