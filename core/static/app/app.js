// gengui's built-in web client. Plain JavaScript, no build step, no dependencies.
// Every piece of user or server text goes in with textContent, never innerHTML.
"use strict";

(() => {
  const API = "/api/v1";
  const PAGE = 12;
  const TERMINAL = new Set(["completed", "failed", "cancelled"]);
  const EVENT_TYPES = [
    "generation.queued", "generation.submitted", "generation.processing",
    "generation.progress", "generation.completed", "generation.failed",
    "generation.cancelled", "thumbnail.ready",
  ];

  // Error codes -> sentences a person understands. Anything else: the server's message.
  const MESSAGES = {
    content_rejected: "The image service refused this prompt. Try describing it differently.",
    timed_out: "This took too long and was stopped. Try again.",
    engine_error: "The image engine ran into a problem. Try again.",
    no_result: "The image service finished without an image. Try again.",
    generation_failed: "The image could not be made. Try again.",
    provider_unknown: "No image service is set up for this request. Contact the operator.",
    daily_quota: "You have made as many images as your plan allows today. Come back tomorrow.",
    too_many_active: "You already have as many images in progress as allowed. " +
      "Wait for one to finish, or cancel one.",
    rate_limited: "You are going a bit fast. Wait a moment and try again.",
    email_unverified: "Verify your e-mail address first: open the link in the mail we sent you.",
    invalid_credentials: "That e-mail and password do not match an account.",
    login_locked: "Too many failed sign-ins. Wait a while before trying again.",
    weak_password: "Choose a longer or less common password (at least 10 characters).",
    invalid_email: "That does not look like an e-mail address.",
    email_domain_not_allowed: "Sign-up is not open to addresses of this domain.",
    invalid_or_expired_token: "That link or code is not valid: it was used already, " +
      "has expired, or was mistyped.",
    already_verified: "Your address is verified already.",
    mail_cooldown: "A mail was sent a moment ago. Check your inbox, or wait a minute.",
    csrf_failed: "Your session needs a refresh. Reload the page and try again.",
    invalid_session: "You have been signed out. Sign in again.",
    invalid_state: "That cannot be done to this image any more.",
    validation_error: "Some of what you entered is not valid.",
    not_found: "That image no longer exists.",
  };

  const STATUS_WORDS = {
    queued: "Waiting in line",
    submitted: "Sent to the image service",
    processing: "Being made",
    completed: "Done",
    failed: "Failed",
    cancelled: "Cancelled",
  };

  const $ = (id) => document.getElementById(id);
  const csrfCookie = document.querySelector('meta[name="gengui-csrf-cookie"]').content;

  let me = null;
  let cursor = null;
  let events = null;
  const cards = new Map(); // generation id -> {el, gen}

  // ---- talking to the API ----------------------------------------------------------

  function csrfToken() {
    for (const part of document.cookie.split(";")) {
      const [name, ...rest] = part.trim().split("=");
      if (name === csrfCookie) return decodeURIComponent(rest.join("="));
    }
    return "";
  }

  class ApiError extends Error {
    constructor(status, body, retryAfter) {
      const err = (body && body.error) || {};
      super(err.message || `HTTP ${status}`);
      this.status = status;
      this.code = err.code || "";
      this.details = err.details;
      this.retryAfter = retryAfter;
    }
  }

  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (method !== "GET") headers["X-CSRF-Token"] = csrfToken();
    const resp = await fetch(API + path, {
      method,
      headers,
      credentials: "same-origin",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (resp.status === 204) return null;
    const data = await resp.json().catch(() => null);
    if (!resp.ok) throw new ApiError(resp.status, data, resp.headers.get("Retry-After"));
    return data;
  }

  function explain(error) {
    if (!(error instanceof ApiError)) return "Cannot reach gengui. Check your connection.";
    let text = MESSAGES[error.code] || error.message;
    if (error.code === "validation_error" && Array.isArray(error.details)) {
      const fields = error.details.map((d) => (d.loc || []).slice(-1)[0]).filter(Boolean);
      if (fields.length) text += ` Check: ${fields.join(", ")}.`;
    }
    const wait = Number(error.retryAfter);
    if (wait > 0) text += ` (Try again in ${wait < 120 ? `${wait} s` : `${Math.ceil(wait / 60)} min`}.)`;
    return text;
  }

  function say(text, isError = false) {
    const status = $("status");
    status.textContent = text;
    status.classList.toggle("is-error", isError);
  }

  // Run a form's action with its submit button disabled; errors are said in words.
  async function busy(button, action) {
    button.disabled = true;
    try {
      await action();
    } catch (error) {
      say(explain(error), true);
    } finally {
      button.disabled = false;
    }
  }

  // ---- views --------------------------------------------------------------------------

  function show(view) {
    $("auth-view").hidden = view !== "auth";
    $("app-view").hidden = view !== "app";
    $("reset-form").hidden = view !== "reset";
    $("account").hidden = view !== "app";
    $("verify-form").hidden = !(view === "auth" || (view === "app" && me && !me.email_verified));
    $("resend").hidden = !(view === "app" && me && !me.email_verified);
  }

  async function refreshMe() {
    try {
      me = await api("GET", "/auth/me");
    } catch (error) {
      if (error instanceof ApiError && error.status === 401) {
        me = null;
      } else {
        throw error;
      }
    }
    return me;
  }

  async function enterApp() {
    $("account-email").textContent = me.email + (me.email_verified ? "" : " (not verified)");
    show("app");
    openEvents();
    await loadPage(true);
  }

  function leaveApp() {
    me = null;
    if (events) events.close();
    events = null;
    cards.clear();
    $("gallery").replaceChildren();
    show("auth");
  }

  // ---- the gallery ----------------------------------------------------------------------

  function makeCard(gen) {
    const el = $("card-template").content.firstElementChild.cloneNode(true);
    el.dataset.id = gen.id;
    el.querySelector(".cancel").addEventListener("click", (e) =>
      busy(e.currentTarget, async () => {
        update(await api("POST", `/generations/${gen.id}/cancel`));
        say("Cancelled.");
      }));
    el.querySelector(".retry").addEventListener("click", (e) =>
      busy(e.currentTarget, async () => {
        update(await api("POST", `/generations/${gen.id}/retry`));
        say("Trying again.");
      }));
    return el;
  }

  function render(el, gen) {
    el.dataset.status = gen.status;
    const prompt = el.querySelector(".prompt");
    prompt.textContent = gen.prompt;
    prompt.title = gen.prompt;
    const meta = `${gen.width} × ${gen.height} · seed ${gen.seed}` +
      (gen.negative_prompt ? ` · without: ${gen.negative_prompt}` : "");
    el.querySelector(".meta").textContent = meta;

    let state = STATUS_WORDS[gen.status] || gen.status;
    if (gen.status === "processing" && typeof gen.progress === "number") {
      state += ` (${Math.round(gen.progress * 100)}%)`;
    }
    if (gen.attempt > 1 && !TERMINAL.has(gen.status)) state += ` · attempt ${gen.attempt}`;
    el.querySelector(".state").textContent = state;

    const bar = el.querySelector("progress");
    bar.hidden = TERMINAL.has(gen.status);
    if (typeof gen.progress === "number") bar.value = gen.progress;
    else bar.removeAttribute("value"); // indeterminate
    bar.setAttribute("aria-label", `Progress of “${gen.prompt.slice(0, 60)}”`);

    const error = el.querySelector(".error");
    error.hidden = gen.status !== "failed";
    if (gen.status === "failed") {
      const code = gen.error && gen.error.code;
      error.textContent = MESSAGES[code] || (gen.error && gen.error.message) ||
        "The image could not be made.";
    }

    const thumb = el.querySelector(".thumb");
    const src = gen.thumbnail_url || null;
    let img = thumb.querySelector("img");
    if (src && (!img || img.getAttribute("src") !== src)) {
      img = document.createElement("img");
      img.alt = gen.prompt;
      img.width = gen.width;
      img.height = gen.height;
      img.src = src;
      thumb.replaceChildren(img);
    }

    const open = el.querySelector(".open");
    open.hidden = !gen.image_url;
    if (gen.image_url) {
      open.href = gen.image_url;
      open.setAttribute("aria-label", `Open the full image of “${gen.prompt.slice(0, 60)}”`);
    }
    el.querySelector(".cancel").hidden = TERMINAL.has(gen.status);
    el.querySelector(".retry").hidden = gen.status !== "failed";
  }

  // Newer than what we hold (events can overtake a list answer): keep the newest.
  function newer(a, b) {
    if (a.attempt !== b.attempt) return a.attempt > b.attempt;
    return a.updated_at >= b.updated_at;
  }

  function update(gen, { prepend = true } = {}) {
    let entry = cards.get(gen.id);
    if (entry) {
      if (!newer(gen, entry.gen)) return;
      const was = entry.gen.status;
      entry.gen = gen;
      render(entry.el, gen);
      if (was !== gen.status && TERMINAL.has(gen.status)) {
        say(`“${gen.prompt.slice(0, 40)}”: ${STATUS_WORDS[gen.status].toLowerCase()}.`);
      }
      return;
    }
    entry = { el: makeCard(gen), gen };
    cards.set(gen.id, entry);
    render(entry.el, gen);
    const gallery = $("gallery");
    if (prepend) gallery.prepend(entry.el);
    else gallery.append(entry.el);
    $("empty").hidden = true;
  }

  async function loadPage(first) {
    if (first) {
      cursor = null;
      cards.clear();
      $("gallery").replaceChildren();
    }
    const query = new URLSearchParams({ limit: String(PAGE) });
    if (cursor) query.set("cursor", cursor);
    const page = await api("GET", `/generations?${query}`);
    for (const gen of page.items) update(gen, { prepend: false });
    cursor = page.next_cursor;
    $("more").hidden = !cursor;
    $("empty").hidden = cards.size > 0;
  }

  // ---- live events ----------------------------------------------------------------------

  function openEvents() {
    if (events) events.close();
    // Same origin: the session cookie goes along. The browser reconnects by itself
    // and sends Last-Event-ID, so nothing is missed.
    events = new EventSource(`${API}/events`, { withCredentials: true });
    const onEvent = (message) => {
      let data;
      try {
        data = JSON.parse(message.data);
      } catch {
        return;
      }
      if (data && data.generation) update(data.generation);
    };
    for (const type of EVENT_TYPES) events.addEventListener(type, onEvent);
    events.addEventListener("resync", () => {
      loadPage(true).catch((error) => say(explain(error), true));
    });
    events.addEventListener("open", () => { document.body.dataset.live = "yes"; });
    events.addEventListener("error", () => {
      document.body.dataset.live = "no";
      if (events && events.readyState === EventSource.CLOSED) {
        // Refused (signed out elsewhere): find out why rather than spin.
        refreshMe().then((who) => { if (!who) leaveApp(); }).catch(() => {});
      }
    });
  }

  // ---- forms ----------------------------------------------------------------------------

  function wire() {
    $("signin-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const form = e.currentTarget;
      busy(form.querySelector("[type=submit]"), async () => {
        const result = await api("POST", "/auth/login", {
          email: form.email.value.trim(),
          password: form.password.value,
        });
        me = result.user;
        form.reset();
        say(`Signed in as ${me.email}.`);
        await enterApp();
      });
    });

    $("signup-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const form = e.currentTarget;
      busy(form.querySelector("[type=submit]"), async () => {
        const email = form.email.value.trim();
        await api("POST", "/auth/signup", { email, password: form.password.value });
        $("signin-email").value = email;
        form.reset();
        say(`Check your mail: we sent a link to ${email}. Open it, or paste its code below.`);
        $("verify-token").focus();
      });
    });

    $("verify-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const form = e.currentTarget;
      busy(form.querySelector("[type=submit]"), async () => {
        await verify(tokenFromPaste(form.token.value));
        form.reset();
      });
    });

    $("resend").addEventListener("click", (e) =>
      busy(e.currentTarget, async () => {
        await api("POST", "/auth/verify/resend");
        say("We sent the mail again.");
      }));

    $("forgot").addEventListener("click", (e) =>
      busy(e.currentTarget, async () => {
        const email = $("signin-email").value.trim();
        if (!email) {
          say("Enter your e-mail address above first.", true);
          $("signin-email").focus();
          return;
        }
        await api("POST", "/auth/password/reset", { email });
        say(`If ${email} has an account, a mail with a reset link is on its way.`);
      }));

    $("reset-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const form = e.currentTarget;
      busy(form.querySelector("[type=submit]"), async () => {
        await api("POST", "/auth/password/reset/confirm", {
          token: form.dataset.token,
          password: form.password.value,
        });
        form.reset();
        history.replaceState(null, "", "/");
        show("auth");
        say("Your password is changed. Sign in with it.");
      });
    });

    $("sign-out").addEventListener("click", (e) =>
      busy(e.currentTarget, async () => {
        await api("POST", "/auth/logout");
        leaveApp();
        say("Signed out.");
      }));

    $("create-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const form = e.currentTarget;
      busy($("create"), async () => {
        const [width, height] = form.size.value.split("x").map(Number);
        const body = { prompt: form.prompt.value, width, height };
        const negative = form.negative_prompt.value.trim();
        if (negative) body.negative_prompt = negative;
        if (form.seed.value !== "") {
          const seed = Number(form.seed.value);
          if (!Number.isInteger(seed) || seed < 0) {
            say("The seed is a whole number, 0 or more.", true);
            form.seed.focus();
            return;
          }
          body.seed = seed;
        }
        if (!body.prompt.trim()) {
          say("Describe the image you want first.", true);
          form.prompt.focus();
          return;
        }
        update(await api("POST", "/generations", body));
        say("Queued. It appears below and updates by itself.");
      });
    });

    $("more").addEventListener("click", (e) =>
      busy(e.currentTarget, () => loadPage(false)));
  }

  // A pasted code, or the whole link from the mail.
  function tokenFromPaste(text) {
    const value = text.trim();
    const at = value.indexOf("#token=");
    return at >= 0 ? value.slice(at + "#token=".length) : value;
  }

  async function verify(token) {
    if (!token) {
      say("Paste the code from the mail first.", true);
      return;
    }
    await api("POST", "/auth/verify", { token });
    say("Your e-mail address is verified.");
    if (await refreshMe()) await enterApp();
    else say("Your e-mail address is verified. Sign in to start.");
  }

  // ---- start ------------------------------------------------------------------------------

  async function start() {
    wire();
    const url = new URL(location.href);
    const fragment = new URLSearchParams(url.hash.slice(1));
    // The mailed links: /verify-email#token=..., /reset-password#token=...; also ?verify=.
    const verifyToken = url.pathname === "/verify-email"
      ? fragment.get("token") : url.searchParams.get("verify");
    const resetToken = url.pathname === "/reset-password" ? fragment.get("token") : null;
    if (verifyToken || resetToken || url.pathname !== "/") {
      history.replaceState(null, "", "/"); // the token leaves the address bar at once
    }

    await refreshMe();
    if (resetToken) {
      $("reset-form").dataset.token = resetToken;
      show("reset");
      $("reset-password").focus();
      return;
    }
    if (me) await enterApp();
    else show("auth");
    if (verifyToken) {
      try {
        await verify(verifyToken);
      } catch (error) {
        say(explain(error), true);
      }
    }
  }

  start().catch((error) => say(explain(error), true));
})();
