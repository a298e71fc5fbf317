#!/usr/bin/env bash
# Refresh the web page's third-party files from the pins in web/package.json.
#
# Runs `npm ci` in web/, then copies the built browser files into src/chatgate/web/vendor/
# (served at /assets/vendor/...) and axe-core into tests/web/vendor/ (page tests only),
# each package's licence text beside them, and a MANIFEST.json per directory listing
# package, version, file and sha256. tests/web/test_assets.py checks the committed files
# against the manifest and the manifest against the pins, so commit all of it together.
#
# Only this script needs npm: the built files are committed, and running or testing
# chatgate does not. Running it twice gives the same files.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
modules="$root/web/node_modules"
vendor="$root/src/chatgate/web/vendor"
test_vendor="$root/tests/web/vendor"

(cd "$root/web" && npm ci --no-audit --no-fund --ignore-scripts)

# package|file in the package|name in the destination
shipped=(
  "marked|lib/marked.umd.js|marked.umd.js"
  "marked|lib/marked.umd.js.map|marked.umd.js.map"
  "dompurify|dist/purify.min.js|purify.min.js"
  "dompurify|dist/purify.min.js.map|purify.min.js.map"
  "@highlightjs/cdn-assets|highlight.min.js|highlight.min.js"
  "@highlightjs/cdn-assets|styles/github.min.css|highlight-light.min.css"
  "@highlightjs/cdn-assets|styles/github-dark.min.css|highlight-dark.min.css"
)
shipped_licences=(
  "marked|LICENSE|marked.LICENSE.md"
  "dompurify|LICENSE|dompurify.LICENSE.txt"
  "dompurify|LICENSE-MPL|dompurify.LICENSE-MPL.txt"
  "@highlightjs/cdn-assets|LICENSE|highlight.js.LICENSE.txt"
)
test_only=(
  "axe-core|axe.min.js|axe.min.js"
)
test_licences=(
  "axe-core|LICENSE|axe-core.LICENSE.txt"
  "axe-core|LICENSE-3RD-PARTY.txt|axe-core.LICENSE-3RD-PARTY.txt"
)

# copy DEST_DIR ENTRY...: copies each entry, printing "package|file" for the manifest
copy() {
  local dest="$1"; shift
  local entry package source name
  mkdir -p "$dest"
  for entry in "$@"; do
    IFS='|' read -r package source name <<<"$entry"
    cp "$modules/$package/$source" "$dest/$name"
    printf '%s|%s\n' "$package" "$name"
  done
}

# manifest DIR: writes DIR/MANIFEST.json from the "package|file" lines on stdin
manifest() {
  local script
  script="$(cat <<'JS'
const fs = require("fs"), path = require("path"), crypto = require("crypto");
const [modules, dir] = process.argv.slice(1);
const lines = fs.readFileSync(0, "utf8").split("\n").filter(Boolean);
const files = lines.map((line) => {
  const [pkg, file] = line.split("|");
  const version = JSON.parse(fs.readFileSync(path.join(modules, pkg, "package.json"), "utf8")).version;
  const sha256 = crypto.createHash("sha256").update(fs.readFileSync(path.join(dir, file))).digest("hex");
  return { package: pkg, version, file, sha256 };
});
fs.writeFileSync(path.join(dir, "MANIFEST.json"), JSON.stringify({ files }, null, 2) + "\n");
JS
)"
  node -e "$script" "$modules" "$1"
}

# licences DIR: LICENSES.md for the packages DIR/MANIFEST.json names
licences() {
  node - "$modules" "$1" <<'JS'
const fs = require("fs"), path = require("path");
const [modules, dir] = process.argv.slice(2);
const { files } = JSON.parse(fs.readFileSync(path.join(dir, "MANIFEST.json"), "utf8"));
const out = [
  "# Third-party files served with chatgate's web page",
  "",
  "Copied unmodified from the npm packages pinned in `web/package.json` by",
  "`scripts/vendor-web.sh`, which also writes `MANIFEST.json` (each file's sha256).",
  "The licence texts are in `licenses/`.",
  "",
  "| Package | Version | Licence | Source | Files |",
  "|---|---|---|---|---|",
];
for (const name of [...new Set(files.map((f) => f.package))]) {
  const meta = JSON.parse(fs.readFileSync(path.join(modules, name, "package.json"), "utf8"));
  const repo = typeof meta.repository === "string" ? meta.repository : (meta.repository || {}).url || "";
  const source = `npm \`${name}@${meta.version}\`` + (repo ? `, ${repo.replace(/^git\+/, "").replace(/^git:/, "https:").replace(/\.git$/, "")}` : "");
  const own = files.filter((f) => f.package === name).map((f) => `\`${f.file}\``).join(", ");
  out.push(`| ${name} | ${meta.version} | ${meta.license} | ${source} | ${own} |`);
}
out.push("");
out.push("Page tests also use axe-core (MPL-2.0), kept with its licence in `tests/web/vendor/`; it is not shipped.");
process.stdout.write(out.join("\n") + "\n");
JS
}

rm -rf "$vendor" "$test_vendor"
{
  copy "$vendor" "${shipped[@]}"
  copy "$vendor/licenses" "${shipped_licences[@]}" | sed 's#|#|licenses/#'
} | manifest "$vendor"
{
  copy "$test_vendor" "${test_only[@]}"
  copy "$test_vendor" "${test_licences[@]}"
} | manifest "$test_vendor"
licences "$vendor" > "$vendor/LICENSES.md"

echo "vendored into src/chatgate/web/vendor/ and tests/web/vendor/; commit them with web/package-lock.json"
