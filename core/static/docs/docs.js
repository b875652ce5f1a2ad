// gengui docs: renders the OpenAPI 3.1 or AsyncAPI 3.0 document named by <body data-spec>.
// Plain DOM, no dependencies. Every text from the document goes in through textContent,
// never innerHTML, so nothing in a description can inject markup.
"use strict";

(function () {
  const body = document.body;
  const specUrl = body.dataset.spec;
  const kind = body.dataset.kind;
  const main = document.getElementById("content");

  // ---- tiny DOM helpers ----------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else node.setAttribute(key, value);
    }
    for (const child of children.flat(Infinity)) {
      if (child === undefined || child === null || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  // `code` spans and blank-line paragraphs: all the markup our descriptions use.
  function prose(text) {
    if (!text) return [];
    return String(text)
      .split(/\n\s*\n/)
      .map((para) =>
        el(
          "p",
          {},
          para.split("`").map((part, i) => (i % 2 ? el("code", {}, part) : part.replace(/\s*\n\s*/g, " ")))
        )
      );
  }

  function refName(ref) {
    return ref.split("/").pop();
  }

  function anchor(prefix, name) {
    return prefix + "-" + String(name).replace(/[^A-Za-z0-9_-]/g, "_");
  }

  // ---- JSON Schema, as people read it ----------------------------------------------------

  function constraints(s) {
    const out = [];
    if (s.format) out.push(s.format);
    if (s.minimum !== undefined) out.push("≥ " + s.minimum);
    if (s.exclusiveMinimum !== undefined) out.push("> " + s.exclusiveMinimum);
    if (s.maximum !== undefined) out.push("≤ " + s.maximum);
    if (s.exclusiveMaximum !== undefined) out.push("< " + s.exclusiveMaximum);
    if (s.multipleOf !== undefined) out.push("multiple of " + s.multipleOf);
    if (s.minLength !== undefined) out.push("length ≥ " + s.minLength);
    if (s.maxLength !== undefined) out.push("length ≤ " + s.maxLength);
    if (s.minItems !== undefined) out.push("items ≥ " + s.minItems);
    if (s.maxItems !== undefined) out.push("items ≤ " + s.maxItems);
    if (s.pattern) out.push("pattern " + s.pattern);
    if (s.default !== undefined) out.push("default " + JSON.stringify(s.default));
    return out;
  }

  // A one-line type: "string (uuid, length ≤ 4000)", "array of Generation", "A | null".
  function typeOf(s) {
    if (!s || Object.keys(s).length === 0) return el("span", { class: "type" }, "any");
    if (s.$ref) {
      const name = refName(s.$ref);
      return el("a", { class: "type ref", href: "#" + anchor("schema", name) }, name);
    }
    const alternatives = s.anyOf || s.oneOf;
    if (alternatives) {
      const parts = [];
      alternatives.forEach((alt, i) => {
        if (i) parts.push(" | ");
        parts.push(typeOf(alt));
      });
      return el("span", { class: "type" }, parts);
    }
    if (s.allOf && s.allOf.length === 1) return typeOf(s.allOf[0]);
    if (s.const !== undefined) return el("span", { class: "type" }, JSON.stringify(s.const));
    if (s.enum) return el("span", { class: "type" }, s.enum.map((v) => JSON.stringify(v)).join(" | "));
    let label;
    if (s.type === "array") {
      return el("span", { class: "type" }, "array of ", typeOf(s.items || {}), extra(s));
    } else if (s.type === "object" && s.additionalProperties && typeof s.additionalProperties === "object") {
      return el("span", { class: "type" }, "object of ", typeOf(s.additionalProperties));
    } else {
      label = Array.isArray(s.type) ? s.type.join(" | ") : s.type || "any";
    }
    return el("span", { class: "type" }, label, extra(s));
  }

  function extra(s) {
    const c = constraints(s);
    return c.length ? el("span", { class: "muted" }, " (" + c.join(", ") + ")") : null;
  }

  // An object schema's properties as a table.
  function propertiesTable(s) {
    const props = s.properties || {};
    const required = new Set(s.required || []);
    const names = Object.keys(props);
    if (!names.length) return el("p", { class: "muted" }, typeOf(s));
    return el(
      "table",
      {},
      el("thead", {}, el("tr", {}, el("th", {}, "field"), el("th", {}, "type"), el("th", {}, "description"))),
      el(
        "tbody",
        {},
        names.map((name) =>
          el(
            "tr",
            {},
            el("td", {}, el("code", {}, name), required.has(name) ? el("span", { class: "req" }, " required") : null),
            el("td", {}, typeOf(props[name])),
            el("td", {}, prose(props[name].description))
          )
        )
      )
    );
  }

  function schemaSection(name, s) {
    return el(
      "section",
      { class: "schema", id: anchor("schema", name) },
      el("h3", {}, name),
      prose(s.description),
      s.properties ? propertiesTable(s) : el("p", {}, typeOf(s))
    );
  }

  function schemasPart(schemas) {
    const names = Object.keys(schemas || {}).sort();
    if (!names.length) return null;
    return el("section", {}, el("h2", { id: "schemas" }, "Schemas"), names.map((n) => schemaSection(n, schemas[n])));
  }

  // ---- OpenAPI ---------------------------------------------------------------------------

  const METHODS = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];

  function content(contentMap) {
    return Object.entries(contentMap || {}).map(([media, item]) =>
      el("div", { class: "media" }, el("code", {}, media), item.schema ? [" — ", typeOf(item.schema)] : null)
    );
  }

  function parametersTable(params) {
    return el(
      "table",
      {},
      el(
        "thead",
        {},
        el("tr", {}, el("th", {}, "name"), el("th", {}, "in"), el("th", {}, "type"), el("th", {}, "description"))
      ),
      el(
        "tbody",
        {},
        params.map((p) =>
          el(
            "tr",
            {},
            el("td", {}, el("code", {}, p.name), p.required ? el("span", { class: "req" }, " required") : null),
            el("td", {}, p.in),
            el("td", {}, typeOf(p.schema)),
            el("td", {}, prose(p.description))
          )
        )
      )
    );
  }

  function operationSection(path, method, op, schemes) {
    const security = op.security || [];
    const auth = security.length
      ? "Auth: " + security.map((req) => Object.keys(req).join(" + ")).join(" or ")
      : "No auth";
    const responses = Object.entries(op.responses || {});
    return el(
      "section",
      { class: "operation", id: anchor("op", op.operationId || method + path) },
      el(
        "h3",
        {},
        el("span", { class: "method " + method }, method.toUpperCase()),
        " ",
        el("code", { class: "path" }, path)
      ),
      el("p", { class: "summary" }, op.summary || ""),
      el("p", { class: "muted" }, auth, op.deprecated ? " · deprecated" : ""),
      prose(op.description),
      op.parameters && op.parameters.length ? [el("h4", {}, "Parameters"), parametersTable(op.parameters)] : null,
      op.requestBody ? [el("h4", {}, "Request body"), content(op.requestBody.content)] : null,
      el("h4", {}, "Responses"),
      el(
        "dl",
        { class: "responses" },
        responses.map(([status, r]) => [
          el("dt", { class: "status s" + String(status)[0] }, status),
          el(
            "dd",
            {},
            prose(r.description),
            content(r.content),
            Object.keys(r.headers || {}).filter((h) => h !== "X-Request-ID").length
              ? el(
                  "div",
                  { class: "muted" },
                  "Headers: ",
                  Object.keys(r.headers)
                    .filter((h) => h !== "X-Request-ID")
                    .map((h, i) => [i ? ", " : "", el("code", {}, h)])
                )
              : null
          ),
        ])
      )
    );
  }

  function renderOpenAPI(doc) {
    const byTag = new Map();
    for (const [path, item] of Object.entries(doc.paths || {})) {
      for (const method of METHODS) {
        const op = item[method];
        if (!op) continue;
        const tag = (op.tags && op.tags[0]) || "other";
        if (!byTag.has(tag)) byTag.set(tag, []);
        byTag.get(tag).push([path, method, op]);
      }
    }
    const tags = [...byTag.keys()].sort();
    const toc = el(
      "nav",
      { class: "toc" },
      tags.map((tag) =>
        el(
          "div",
          {},
          el("strong", {}, tag),
          el(
            "ul",
            {},
            byTag.get(tag).map(([path, method, op]) =>
              el(
                "li",
                {},
                el(
                  "a",
                  { href: "#" + anchor("op", op.operationId || method + path) },
                  el("span", { class: "method " + method }, method.toUpperCase()),
                  " ",
                  path
                )
              )
            )
          )
        )
      ),
      el("div", {}, el("a", { href: "#schemas" }, "Schemas"))
    );
    const schemes = (doc.components && doc.components.securitySchemes) || {};
    return [
      el("section", { class: "info" }, el("p", { class: "muted" }, "Version " + doc.info.version + " · OpenAPI " + doc.openapi), prose(doc.info.description)),
      Object.keys(schemes).length
        ? el(
            "section",
            {},
            el("h2", {}, "Authentication"),
            el(
              "ul",
              {},
              Object.entries(schemes).map(([name, s]) =>
                el("li", {}, el("code", {}, name), ": ", s.type, s.scheme ? " " + s.scheme : "", s.in ? " in " + s.in + " " + s.name : "", prose(s.description))
              )
            )
          )
        : null,
      toc,
      tags.map((tag) =>
        el("section", {}, el("h2", {}, tag), byTag.get(tag).map(([path, method, op]) => operationSection(path, method, op, schemes)))
      ),
      schemasPart(doc.components && doc.components.schemas),
    ];
  }

  // ---- AsyncAPI --------------------------------------------------------------------------

  function renderAsyncAPI(doc) {
    const channels = doc.channels || {};
    const operations = Object.entries(doc.operations || {});
    const messages = (doc.components && doc.components.messages) || {};
    return [
      el("section", { class: "info" }, el("p", { class: "muted" }, "Version " + doc.info.version + " · AsyncAPI " + doc.asyncapi), prose(doc.info.description)),
      el(
        "nav",
        { class: "toc" },
        el("strong", {}, "Channels"),
        el(
          "ul",
          {},
          Object.entries(channels).map(([id, ch]) => el("li", {}, el("a", { href: "#" + anchor("channel", id) }, el("code", {}, ch.address))))
        ),
        el("div", {}, el("a", { href: "#messages" }, "Messages"), " · ", el("a", { href: "#schemas" }, "Schemas"))
      ),
      el(
        "section",
        {},
        el("h2", {}, "Channels"),
        Object.entries(channels).map(([id, ch]) =>
          el(
            "section",
            { class: "operation", id: anchor("channel", id) },
            el("h3", {}, el("code", { class: "path" }, ch.address)),
            prose(ch.description),
            ch.parameters
              ? [
                  el("h4", {}, "Parameters"),
                  el(
                    "ul",
                    {},
                    Object.entries(ch.parameters).map(([name, p]) =>
                      el("li", {}, el("code", {}, name), p.enum ? " — one of " + p.enum.join(", ") : "", prose(p.description))
                    )
                  ),
                ]
              : null,
            el("h4", {}, "Operations"),
            el(
              "ul",
              {},
              operations
                .filter(([, op]) => op.channel && op.channel.$ref === "#/channels/" + id)
                .map(([opId, op]) => el("li", {}, el("span", { class: "method " + op.action }, op.action), " ", op.summary || opId))
            ),
            el("h4", {}, "Messages"),
            el(
              "ul",
              {},
              Object.keys(ch.messages || {}).map((name) => el("li", {}, el("a", { href: "#" + anchor("message", name) }, name)))
            )
          )
        )
      ),
      el(
        "section",
        {},
        el("h2", { id: "messages" }, "Messages"),
        Object.entries(messages).map(([name, m]) =>
          el(
            "section",
            { class: "schema", id: anchor("message", name) },
            el("h3", {}, name),
            prose(m.description || m.summary),
            el("p", {}, "Payload: ", typeOf(m.payload), " (", el("code", {}, m.contentType || doc.defaultContentType), ")")
          )
        )
      ),
      schemasPart(doc.components && doc.components.schemas),
    ];
  }

  fetch(specUrl, { headers: { Accept: "application/json" } })
    .then((r) => {
      if (!r.ok) throw new Error(specUrl + ": HTTP " + r.status);
      return r.json();
    })
    .then((doc) => {
      main.replaceChildren(...[kind === "asyncapi" ? renderAsyncAPI(doc) : renderOpenAPI(doc)].flat(Infinity).filter(Boolean));
      if (location.hash) {
        const target = document.getElementById(location.hash.slice(1));
        if (target) target.scrollIntoView();
      }
    })
    .catch((err) => {
      main.replaceChildren(el("p", { class: "error" }, "Could not load the document: " + err.message));
    });
})();
