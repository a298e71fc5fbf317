// chatgate's chat page: conversations, streaming answers, stop, resume after a reload or
// a dropped connection, a queue for messages sent while an answer runs or while offline.
//
// A reply ("generation") is started with an id made here; its id, its conversation and
// the text received so far with its last seq are kept in sessionStorage, so a reloaded or
// reconnected page sends the native `resume` with `after` = that seq and gets the rest of
// the answer exactly once.

import { Api, Connection, HttpError, KeyNeeded } from "./connection.js";
import { Log } from "./log.js";
import { Sidebar, conversationLink } from "./sidebar.js";
import { applyTheme, storedTheme, toggleTheme } from "./theme.js";

const RUNNING = "chatgate.running";
const QUEUE = "chatgate.queue";
const MODEL = "chatgate.model";
const AGENT = "chatgate.agent";

const $ = (id) => document.getElementById(id);
const ui = {
  log: $("log"), form: $("form"), input: $("input"), send: $("send"), stop: $("stop"),
  status: $("status"), agent: $("agent"), model: $("model"), keyform: $("keyform"),
  key: $("key"), announcer: $("announcer"), newChat: $("new"), theme: $("theme"),
};

function newId() {
  return [...crypto.getRandomValues(new Uint8Array(16))].map((b) => b.toString(16).padStart(2, "0")).join("");
}

function readStored(key, fallback) {
  try {
    return JSON.parse(sessionStorage.getItem(key)) ?? fallback;
  } catch {
    return fallback;
  }
}

const state = {
  conversationId: newId(),
  fresh: true,                               // nothing sent yet: the URL has no #c=
  running: new Map(readStored(RUNNING, []).map((g) => [g.id, g])),
  queue: readStored(QUEUE, []),              // [{conversationId, text}]
  loads: 0,
};
const views = new Map();                     // generation id -> {entry, markdown}

const api = new Api();
const connection = new Connection(api, { onEvent, onState });
const sidebar = new Sidebar(api, {
  list: $("conversations"), toggle: $("sidebar-toggle"), panel: $("sidebar"),
  onDelete: (id) => { if (id === state.conversationId) newChat(); },
});

// Storage ------------------------------------------------------------------------------

let saving = 0;
function saveSoon() {
  if (!saving) saving = requestAnimationFrame(save);
}
function save() {
  cancelAnimationFrame(saving);
  saving = 0;
  const running = [...state.running.values()].map(({ resuming, ...kept }) => kept);
  sessionStorage.setItem(RUNNING, JSON.stringify(running));
  sessionStorage.setItem(QUEUE, JSON.stringify(state.queue));
}
addEventListener("pagehide", save);

// The log ------------------------------------------------------------------------------

const log = new Log(ui.log);

function attach(generation) {
  views.set(generation.id, log.streamingAnswer(generation.model, generation.text));
}

function queuedNote() {
  return connection.open ? "when the current reply ends" : "when the connection is back";
}

function refreshActions() {
  log.setActions(!busy(state.conversationId), {
    edit: (text) => {
      ui.input.value = text;
      ui.input.focus();
      ui.input.select();
    },
    regenerate: (text) => submitText(text),
  });
}

// Conversations ------------------------------------------------------------------------

function hashConversation() {
  const match = /^#c=(.+)$/.exec(location.hash);
  return match ? decodeURIComponent(match[1]) : null;
}

function newChat() {
  sidebar.setOpen(false);
  if (location.hash) history.pushState(null, "", location.pathname + location.search);
  show(null).catch(failed);
  ui.input.focus();
}

async function show(id) {
  const load = ++state.loads;
  views.clear();
  log.clear();
  state.conversationId = id || newId();
  state.fresh = !id;
  sidebar.select(id);
  let messages = [];
  if (id) {
    try {
      const conversation = await api.json("conversations/" + encodeURIComponent(id));
      messages = conversation.messages;
      if ([...ui.agent.options].some((o) => o.value === conversation.agent)) ui.agent.value = conversation.agent;
    } catch (error) {
      if (!(error instanceof HttpError && error.status === 404)) throw error;
    }
  }
  if (load !== state.loads) return;
  log.clear();
  const running = [...state.running.values()].filter((g) => g.conversationId === state.conversationId);
  for (const generation of running) {
    // The stored turn of a running reply: its question, and a checkpoint of its answer
    // (the reply on screen is built from the text kept here and what the resume sends).
    const lastUser = messages.findLastIndex((m) => m.role === "user");
    if (lastUser >= 0 && messages[lastUser].content === generation.userText) messages = messages.slice(0, lastUser);
  }
  for (const message of messages) log.stored(message);
  for (const generation of running) {
    log.question(generation.userText);
    attach(generation);
  }
  showQueued();
  refreshActions();
  updateControls();
}

addEventListener("hashchange", () => {
  if (location.hash && !location.hash.startsWith("#c=")) return;  // not a conversation's address
  if (hashConversation() !== state.conversationId || state.fresh) show(hashConversation()).catch(failed);
});

// Turns ---------------------------------------------------------------------------------

const busy = (conversationId) => [...state.running.values()].some((g) => g.conversationId === conversationId);

function claimUrl() {
  if (!state.fresh) return;
  state.fresh = false;
  sidebar.current = state.conversationId;
  history.pushState(null, "", conversationLink(state.conversationId));
}

function submitText(text) {
  const conversationId = state.conversationId;
  claimUrl();
  const waiting = state.queue.some((item) => item.conversationId === conversationId);
  if (connection.open && !busy(conversationId) && !waiting) startTurn(conversationId, text);
  else {
    state.queue.push({ conversationId, text });
    log.question(text, queuedNote());
    save();
  }
  updateControls();
}

function startTurn(conversationId, text, { showQuestion = true } = {}) {
  const generation = {
    id: newId(), conversationId, userText: text, seq: 0, text: "", started: false,
    agent: ui.agent.value || "general", model: ui.model.value || "",
  };
  state.running.set(generation.id, generation);
  if (conversationId === state.conversationId) {
    if (showQuestion) log.question(text);
    attach(generation);
    refreshActions();
  }
  save();
  sendChat(generation);
  updateControls();
}

function sendChat(generation) {
  const frame = {
    type: "chat", id: generation.id, conversation_id: generation.conversationId,
    message: generation.userText, agent: generation.agent,
  };
  if (generation.model) frame.model = generation.model;
  connection.send(frame);
}

/** Send the first queued message of each conversation that is not answering. */
function drainQueue() {
  if (!connection.open) return;
  const started = new Set();
  state.queue = state.queue.filter((item) => {
    if (started.has(item.conversationId) || busy(item.conversationId)) return true;
    started.add(item.conversationId);
    if (item.conversationId === state.conversationId) log.removeQueued();
    startTurn(item.conversationId, item.text);
    return false;
  });
  if (started.has(state.conversationId)) showQueued();
  save();
}

function showQueued() {
  for (const item of state.queue) if (item.conversationId === state.conversationId) log.question(item.text, queuedNote());
}

function stop() {
  for (const generation of state.running.values()) {
    if (generation.conversationId === state.conversationId) connection.send({ type: "cancel", id: generation.id });
  }
}

// Events --------------------------------------------------------------------------------

function onEvent(event) {
  const generation = event.id ? state.running.get(event.id) : undefined;
  if (event.type === "start" && generation) {
    generation.started = true;
    generation.model = event.model;
    const view = views.get(generation.id);
    if (view) view.entry.querySelector(".meta").textContent = event.model;
    save();
    sidebar.refresh().catch(() => {});
  } else if ((event.type === "delta" || event.type === "tool_call") && generation) {
    if (event.seq <= generation.seq) return;  // already shown: a replay overlapping what we have
    generation.seq = event.seq;
    generation.resuming = false;
    if (event.type === "delta") {
      generation.text += event.text;
      views.get(generation.id)?.markdown.append(event.text);
    }
    saveSoon();
  } else if (event.type === "done" && generation) {
    ended(generation);
    const view = views.get(generation.id);
    if (view) {
      view.markdown.finish();
      const cancelled = event.finish_reason === "cancelled";
      if (cancelled) view.entry.querySelector(".msg").classList.add("partial");
      view.entry.querySelector(".meta").textContent = describe(generation, event);
      announce(cancelled ? "Stopped. " + generation.text : generation.text);
    }
  } else if (event.type === "error") {
    if (generation) failedReply(generation, event);
    else log.error(event.message);
  }
}

function describe(generation, done) {
  const parts = [generation.model];
  const { ttft_ms: ttft, total_ms: total } = done.timings || {};
  const tokens = done.usage?.completion_tokens;
  if (ttft != null) parts.push(`first token ${Math.round(ttft)} ms`);
  const streaming = ttft != null && total > ttft ? total - ttft : total;
  if (tokens && streaming > 0) parts.push(`${(tokens / (streaming / 1000)).toFixed(1)} tokens/s`);
  if (done.finish_reason === "cancelled") parts.push("stopped");
  if (done.finish_reason === "length") parts.push("cut short (length limit)");
  return parts.filter(Boolean).join(" · ");
}

function ended(generation) {
  state.running.delete(generation.id);
  save();
  if (!views.has(generation.id) && generation.conversationId === state.conversationId) {
    show(state.conversationId).catch(failed);  // it ended while the page was loading: read the stored answer
  }
  views.get(generation.id)?.markdown.flush();
  refreshActions();
  updateControls();
  sidebar.refresh().catch(() => {});
  queueMicrotask(drainQueue);
}

function failedReply(generation, error) {
  if (error.code === "not_found" && generation.resuming) {
    if (!generation.started && !generation.resent) {
      generation.resent = true;  // the socket dropped before the gateway had the message
      generation.resuming = false;
      sendChat(generation);
      return;
    }
    ended(generation);  // gone from the gateway: what it stored is in the conversation
    if (generation.conversationId === state.conversationId) show(state.conversationId).catch(failed);
    return;
  }
  const view = views.get(generation.id);
  ended(generation);
  if (generation.conversationId !== state.conversationId) return;
  view?.markdown.finish();
  const answered = Boolean(generation.text);
  if (view && answered) {
    view.entry.querySelector(".msg").classList.add("partial");
    view.entry.querySelector(".meta").textContent = [generation.model, "interrupted"].filter(Boolean).join(" · ");
  } else view?.entry.remove();
  const message = error.code === "busy"
    ? "this conversation is still answering another message (in another tab?)"
    : error.message;
  log.error(message, error.retryable !== false || error.code === "busy" ? () => {
    if (answered) submitText(generation.userText);
    else if (connection.open && !busy(generation.conversationId)) {
      startTurn(generation.conversationId, generation.userText, { showQuestion: false });
    } else submitText(generation.userText);
  } : null);
}

function announce(text) {
  ui.announcer.textContent = text.length > 600 ? text.slice(0, 600) + "…" : text;
}

// Connection state and controls ---------------------------------------------------------

const STATUS = { connecting: "connecting…", connected: "connected", reconnecting: "reconnecting…", offline: "offline" };

function onState(name) {
  if (name === "key") return askForKey();
  ui.status.textContent = STATUS[name];
  if (name === "connected") {
    for (const generation of state.running.values()) {
      generation.resuming = true;
      connection.send({ type: "resume", id: generation.id, after: generation.seq });
    }
    drainQueue();
  }
  updateControls();
}

function updateControls() {
  const running = busy(state.conversationId);
  ui.send.textContent = connection.open ? "Send" : "Offline — will send";
  ui.stop.disabled = !(running && connection.open);
}

function askForKey() {
  ui.status.textContent = api.key ? "wrong API key" : "API key needed";
  ui.keyform.hidden = false;
  ui.key.focus();
}

function failed(error) {
  if (error instanceof KeyNeeded) askForKey();
  else log.error(error.message || String(error));
}

// Pickers -------------------------------------------------------------------------------

async function loadAgents() {
  const { details } = await api.json("agents");
  ui.agent.replaceChildren(...details.map((agent) => {
    const option = new Option(agent.name, agent.name);
    if (agent.description) option.title = agent.description;
    return option;
  }));
  const remembered = localStorage.getItem(AGENT);
  if (details.some((a) => a.name === remembered)) ui.agent.value = remembered;
}

async function loadModels() {
  let models = [];
  try {
    models = (await api.json("v1/models")).data.map((m) => m.id);
  } catch (error) {
    if (error instanceof KeyNeeded) throw error;  // no listing: the agent's model it is
  }
  ui.model.replaceChildren(new Option("agent's default", ""), ...models.map((id) => new Option(id, id)));
  const remembered = localStorage.getItem(MODEL);
  if (models.includes(remembered)) ui.model.value = remembered;
}

ui.agent.addEventListener("change", () => localStorage.setItem(AGENT, ui.agent.value));
ui.model.addEventListener("change", () => localStorage.setItem(MODEL, ui.model.value));

// Input ---------------------------------------------------------------------------------

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.input.value.trim();
  if (!text) return;
  ui.input.value = "";
  submitText(text);
});
ui.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.form.requestSubmit();
  }
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && busy(state.conversationId)) {
    event.preventDefault();
    stop();
  }
});
ui.stop.addEventListener("click", () => {
  stop();
  ui.input.focus();  // the button is disabled once the reply ends
});
document.querySelector(".skip").addEventListener("click", (event) => {
  event.preventDefault();  // the address names the conversation: keep it
  ui.input.focus();
});
ui.newChat.addEventListener("click", newChat);
ui.theme.addEventListener("click", () => applyTheme(toggleTheme()));
ui.keyform.addEventListener("submit", (event) => {
  event.preventDefault();
  api.setKey(ui.key.value.trim());
  ui.key.value = "";
  ui.keyform.hidden = true;
  boot();
});

async function boot() {
  try {
    await Promise.all([loadAgents(), loadModels()]);
    await Promise.all([sidebar.refresh(), show(hashConversation())]);
  } catch (error) {
    if (error instanceof KeyNeeded) return askForKey();
    log.error(error.message || String(error));
  }
  connection.start();
}

applyTheme(storedTheme());
updateControls();
boot();
