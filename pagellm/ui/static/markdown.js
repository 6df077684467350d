// A small Markdown renderer for model answers: fenced code (with its language and a copy
// button), headings, lists, block quotes, tables, rules, paragraphs; inline code, bold,
// italics, links. Every piece of text is HTML-escaped first, so a model's output can
// never inject markup; links keep only http(s), mailto and relative targets. An unclosed
// fence (a stream still running) renders as code up to the end.
"use strict";

const Markdown = (() => {
  const esc = (s) => PL.escapeHtml(s);

  function inline(text) {
    const codes = [];
    let s = text.replace(/`([^`\n]+)`/g, (_, c) => {
      codes.push("<code>" + esc(c) + "</code>");
      return "\u0000" + (codes.length - 1) + "\u0000";
    });
    s = esc(s);
    s = s.replace(/\[([^\]\n]+)\]\(([^)\s]+)\)/g, (m, label, url) => {
      if (!/^(https?:|mailto:|\/|#)/i.test(url)) return m;
      return '<a href="' + url + '" target="_blank" rel="noopener noreferrer">' + label + "</a>";
    });
    s = s.replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>");
    s = s.replace(/__([^_\n]+)__/g, "<strong>$1</strong>");
    s = s.replace(/(^|[^*\w])\*([^*\n]+)\*(?!\*)/g, "$1<em>$2</em>");
    s = s.replace(/(^|[^_\w])_([^_\n]+)_(?!\w)/g, "$1<em>$2</em>");
    s = s.replace(/~~([^~\n]+)~~/g, "<del>$1</del>");
    return s.replace(/\u0000(\d+)\u0000/g, (_, i) => codes[+i]);
  }

  function codeBlock(lang, lines) {
    const label = lang ? '<span class="lang">' + esc(lang) + "</span>" : "";
    const cls = lang ? ' class="language-' + esc(lang) + '"' : "";
    return (
      "<pre>" + label + "<code" + cls + ">" + esc(lines.join("\n")) + "</code>" +
      '<button class="copy" type="button">copy</button></pre>'
    );
  }

  function table(rows) {
    const cells = (row) =>
      row.replace(/^\s*\|/, "").replace(/\|\s*$/, "").split("|").map((c) => c.trim());
    const head = cells(rows[0]);
    let html = "<table><thead><tr>" + head.map((c) => "<th>" + inline(c) + "</th>").join("");
    html += "</tr></thead><tbody>";
    for (const row of rows.slice(2)) {
      html += "<tr>" + cells(row).map((c) => "<td>" + inline(c) + "</td>").join("") + "</tr>";
    }
    return html + "</tbody></table>";
  }

  function render(text) {
    const lines = String(text || "").replace(/\r\n?/g, "\n").split("\n");
    const out = [];
    let para = [];
    let list = null; // {tag, items}
    const flushPara = () => {
      if (para.length) out.push("<p>" + para.map(inline).join("<br>") + "</p>");
      para = [];
    };
    const flushList = () => {
      if (list) {
        out.push("<" + list.tag + ">" + list.items.map((i) => "<li>" + inline(i) + "</li>").join("") +
                 "</" + list.tag + ">");
      }
      list = null;
    };
    const flush = () => {
      flushPara();
      flushList();
    };
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      const fence = line.match(/^\s*(```|~~~)\s*([\w+#.-]*)\s*$/);
      if (fence) {
        flush();
        const body = [];
        i++;
        while (i < lines.length && !lines[i].trim().startsWith(fence[1])) body.push(lines[i++]);
        out.push(codeBlock(fence[2], body));
        continue;
      }
      if (!line.trim()) {
        flush();
        continue;
      }
      const heading = line.match(/^(#{1,6})\s+(.*)$/);
      if (heading) {
        flush();
        const n = heading[1].length;
        out.push("<h" + n + ">" + inline(heading[2]) + "</h" + n + ">");
        continue;
      }
      if (/^\s*([-*_])(\s*\1){2,}\s*$/.test(line)) {
        flush();
        out.push("<hr>");
        continue;
      }
      if (/^\s*>/.test(line)) {
        flush();
        const quote = [];
        while (i < lines.length && /^\s*>/.test(lines[i])) quote.push(lines[i++].replace(/^\s*>\s?/, ""));
        i--;
        out.push("<blockquote>" + render(quote.join("\n")) + "</blockquote>");
        continue;
      }
      if (/^\s*\|.*\|\s*$/.test(line) && i + 1 < lines.length &&
          /^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$/.test(lines[i + 1])) {
        flush();
        const rows = [];
        while (i < lines.length && /^\s*\|.*\|\s*$/.test(lines[i])) rows.push(lines[i++]);
        i--;
        out.push(table(rows));
        continue;
      }
      const item = line.match(/^\s*([-*+]|\d+[.)])\s+(.*)$/);
      if (item) {
        flushPara();
        const tag = /\d/.test(item[1]) ? "ol" : "ul";
        if (list && list.tag !== tag) flushList();
        if (!list) list = { tag, items: [] };
        list.items.push(item[2]);
        continue;
      }
      if (list && /^\s{2,}\S/.test(line)) {
        list.items[list.items.length - 1] += " " + line.trim();
        continue;
      }
      flushList();
      para.push(line);
    }
    flush();
    return out.join("\n");
  }

  // The copy buttons of code blocks (one listener for the whole page).
  document.addEventListener("click", (ev) => {
    const b = ev.target;
    if (!(b instanceof HTMLElement) || !b.classList.contains("copy")) return;
    const code = b.parentElement.querySelector("code");
    if (code && navigator.clipboard) navigator.clipboard.writeText(code.textContent);
    b.textContent = "copied";
    setTimeout(() => (b.textContent = "copy"), 1200);
  });

  return { render, inline };
})();
