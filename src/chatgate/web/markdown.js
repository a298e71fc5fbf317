// Model text to safe DOM: Markdown (marked), sanitized (DOMPurify), code highlighted
// (highlight.js), each code block with a copy button.
//
// Model text is untrusted. Whatever it holds, the rendered answer can run no script, load
// nothing from anywhere (only inline data: images survive) and navigate nowhere but to
// http(s) or mailto links that open in a new tab without a referrer. HTML in it is shown
// as text; DOMPurify then allows only the elements Markdown makes.

const { marked, DOMPurify, hljs } = globalThis;

const ALLOWED_TAGS = [
  "a", "b", "blockquote", "br", "code", "del", "em", "h1", "h2", "h3", "h4", "h5", "h6",
  "hr", "i", "img", "kbd", "li", "ol", "p", "pre", "s", "strong", "sub", "sup", "table",
  "tbody", "td", "th", "thead", "tr", "ul",
];
const ALLOWED_ATTR = ["href", "title", "alt", "src", "class", "start", "align", "colspan", "rowspan"];
const LINK_PROTOCOLS = new Set(["http:", "https:", "mailto:"]);
const DATA_IMAGE = /^data:image\/(png|gif|jpeg|webp|avif);base64,/i;
const LANGUAGE_CLASS = /^language-[\w+#.-]{1,40}$/;

let hooked = false;

function installHooks() {
  if (hooked) return;
  hooked = true;
  hljs.configure({ ignoreUnescapedHTML: true });
  // HTML in model text is shown as text, never parsed: only Markdown makes elements. (The
  // sanitizer below would strip it, but a parsed handler or style already costs the page
  // a Content-Security-Policy report.)
  marked.use({ renderer: { html: (token) => escapeHtml(token.text) } });
  // Only a code block's language survives as a class: model text cannot borrow the page's.
  DOMPurify.addHook("uponSanitizeAttribute", (node, data) => {
    if (data.attrName === "class" && !(node.nodeName === "CODE" && LANGUAGE_CLASS.test(data.attrValue))) {
      data.keepAttr = false;
    }
  });
  DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.nodeName === "A") {
      const href = node.getAttribute("href");
      if (href !== null && !isSafeLink(href)) node.removeAttribute("href");
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer");
    } else if (node.nodeName === "IMG") {
      const src = node.getAttribute("src") || "";
      // Removed here, in DOMPurify's inert document: an <img> with a src starts loading as
      // soon as it belongs to the page's document, even before it is attached.
      if (!DATA_IMAGE.test(src)) {
        node.removeAttribute("src");
        node.setAttribute("data-blocked", "");
      }
    }
  });
}

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function isSafeLink(href) {
  try {
    return LINK_PROTOCOLS.has(new URL(href).protocol);  // relative URLs throw: no base given
  } catch {
    return false;
  }
}

/** Markdown source to a sanitized DocumentFragment, highlighted, with copy buttons. */
export function toFragment(source) {
  installHooks();
  const html = marked.parse(source, { gfm: true, breaks: false, async: false });
  const fragment = DOMPurify.sanitize(html, {
    ALLOWED_TAGS, ALLOWED_ATTR, RETURN_DOM_FRAGMENT: true, ALLOW_DATA_ATTR: false,
  });
  for (const img of fragment.querySelectorAll("img[data-blocked]")) {
    img.replaceWith(document.createTextNode(img.getAttribute("alt") || ""));
  }
  for (const code of fragment.querySelectorAll("pre > code")) decorateCode(code);
  return fragment;
}

function decorateCode(code) {
  const match = /(?:^|\s)language-([\w+#.-]+)/.exec(code.className);
  const language = match && hljs.getLanguage(match[1]) ? match[1] : null;
  if (match && !language) code.className = "";
  hljs.highlightElement(code);
  const pre = code.parentElement;
  const block = document.createElement("div");
  block.className = "code-block";
  const bar = document.createElement("div");
  bar.className = "code-bar";
  bar.dataset.language = language || code.result?.language || "";
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "copy";
  copy.setAttribute("aria-label", "Copy code");
  bar.appendChild(copy);
  pre.replaceWith(block);
  block.append(bar, pre);
}

/** Click handler for a container holding rendered answers: copies a code block. */
export async function copyCode(event) {
  const button = event.target.closest?.("button.copy");
  if (!button) return;
  const code = button.closest(".code-block")?.querySelector("pre code");
  if (!code) return;
  try {
    await navigator.clipboard.writeText(code.textContent);
    flash(button, "copied", "Copied");
  } catch {
    flash(button, "failed", "Copy failed");
  }
}

function flash(button, state, label) {
  button.dataset.state = state;
  button.setAttribute("aria-label", label);
  setTimeout(() => {
    delete button.dataset.state;
    button.setAttribute("aria-label", "Copy code");
  }, 1500);
}

/** Render ``source`` into ``element`` at once (history, finished answers). */
export function renderMarkdown(element, source) {
  element.replaceChildren(toFragment(source));
}

/**
 * An answer rendered while it streams, without re-rendering what is done.
 *
 * Blocks the lexer has closed (a later block began after them) are rendered once and kept;
 * only the open last block is rendered again, at most once per animation frame. At the end
 * the whole text is rendered once more only if that differs (a reference link defined
 * late, a list continued after a blank line).
 */
export class StreamingMarkdown {
  /** ``onRender()`` runs after each render (to keep the answer scrolled into view). */
  constructor(element, onRender = () => {}) {
    this.element = element;
    this.onRender = onRender;
    this.source = "";
    this.committed = 0;          // characters of source rendered as closed blocks
    this.tail = null;            // the element holding the open block's nodes
    this.frame = 0;
  }

  append(text) {
    this.source += text;
    if (!this.frame) this.frame = requestAnimationFrame(() => this.flush());
  }

  /** Render what has arrived now (the next frame would have). */
  flush() {
    if (this.frame) cancelAnimationFrame(this.frame);
    this.frame = 0;
    const open = this.source.slice(this.committed);
    const tokens = marked.lexer(open).filter((token) => token.type !== "space");
    const closed = tokens.length > 1 ? tokens.slice(0, -1) : [];
    let end = 0;
    for (const token of closed) {
      const at = open.indexOf(token.raw, end);
      if (at < 0) break;  // the lexer rewrote the text (tabs, line ends): keep it open
      end = at + token.raw.length;
    }
    if (end > 0) {
      this.tail?.remove();
      this.tail = null;
      this.element.appendChild(blockOf(toFragment(open.slice(0, end))));
      this.committed += end;
    }
    const rest = this.source.slice(this.committed);
    if (!this.tail) {
      this.tail = document.createElement("div");
      this.tail.className = "md-open";
      this.element.appendChild(this.tail);
    }
    this.tail.replaceChildren(toFragment(rest));
    this.onRender();
  }

  /** The answer ended: render it as a whole if the blocks rendered apart differ from that. */
  finish() {
    this.flush();
    const whole = document.createElement("div");
    whole.appendChild(toFragment(this.source));
    const parts = document.createElement("div");
    for (const block of this.element.children) parts.append(...[...block.childNodes].map((n) => n.cloneNode(true)));
    if (whole.innerHTML !== parts.innerHTML) {
      this.element.replaceChildren(blockOf(toFragment(this.source)));
      this.onRender();
    }
    this.tail = null;
  }
}

function blockOf(fragment) {
  const block = document.createElement("div");
  block.className = "md-block";
  block.appendChild(fragment);
  return block;
}
