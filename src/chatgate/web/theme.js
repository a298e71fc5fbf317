// Light or dark: the system's preference until the user picks one, which is remembered.

const THEME = "chatgate.theme";
const systemDark = matchMedia("(prefers-color-scheme: dark)");

export function storedTheme() {
  const theme = localStorage.getItem(THEME);
  return theme === "light" || theme === "dark" ? theme : null;
}

/** Flip the theme on screen, remember the choice, and return it. */
export function toggleTheme() {
  const theme = isDark(storedTheme()) ? "light" : "dark";
  localStorage.setItem(THEME, theme);
  return theme;
}

function isDark(theme) {
  return theme ? theme === "dark" : systemDark.matches;
}

/** Show ``theme`` ("light", "dark", or null for the system's), code colours included. */
export function applyTheme(theme) {
  const root = document.documentElement;
  if (theme) root.dataset.theme = theme;
  else delete root.dataset.theme;
  const dark = isDark(theme);
  document.getElementById("code-light").media = theme ? (dark ? "not all" : "all") : "not all and (prefers-color-scheme: dark)";
  document.getElementById("code-dark").media = theme ? (dark ? "all" : "not all") : "(prefers-color-scheme: dark)";
  const toggle = document.getElementById("theme");
  toggle.setAttribute("aria-pressed", String(dark));
}

systemDark.addEventListener("change", () => applyTheme(storedTheme()));
