// The model page's playground (templates/serving/partials/playground.html): the form is POSTed
// with fetch() and the answer's server-sent events are read as they arrive (a ReadableStream),
// so the text appears token by token. The events are the dashboard's relay of the pool's serving
// process (r1platform/serving/playground.py): OpenAI's completion or chat chunks, then
// "r1-stats" (time to first token, tokens/s, the version that answered) or "r1-error".
(function () {
  "use strict";

  function textOf(chunk) {
    const choice = (chunk.choices || [])[0];
    if (!choice) return "";
    if (choice.delta) return choice.delta.content || "";
    return choice.text || "";
  }

  function statsText(s) {
    const parts = [];
    if (s.ttft_ms !== null) parts.push(`TTFT ${Math.round(s.ttft_ms)} ms`);
    if (s.tokens_per_s !== null) parts.push(`${s.tokens_per_s} tokens/s`);
    parts.push(`${s.tokens} token${s.tokens === 1 ? "" : "s"} in ${s.seconds.toFixed(2)} s`);
    parts.push(`answered by v${s.version} on ${s.pool}`);
    if (s.finish_reason) parts.push(`finish: ${s.finish_reason}`);
    return parts.join(" · ");
  }

  function setup(form) {
    const panel = form.closest("section");
    const output = panel.querySelector("[data-playground-output]");
    const errorBox = panel.querySelector("[data-playground-error]");
    const statsLine = panel.querySelector("[data-playground-stats]");
    const send = form.querySelector("button[type=submit]");
    const stop = form.querySelector("[data-playground-stop]"); // a span: .btn would show through hidden
    const csrf = form.querySelector("[name=csrfmiddlewaretoken]").value;
    let controller = null;

    function fail(message) {
      errorBox.textContent = message;
      errorBox.hidden = false;
    }

    function handle(block) {
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (!data.length) return;
      const text = data.join("\n");
      if (name === "r1-stats") {
        statsLine.textContent = statsText(JSON.parse(text));
        statsLine.hidden = false;
      } else if (name === "r1-error") {
        fail(JSON.parse(text).message);
      } else if (text !== "[DONE]") {
        output.textContent += textOf(JSON.parse(text));
      }
    }

    async function run() {
      controller = new AbortController();
      output.textContent = "";
      output.hidden = false;
      errorBox.hidden = true;
      statsLine.hidden = true;
      send.disabled = true;
      stop.hidden = false;
      try {
        const response = await fetch(form.action, {
          method: "POST",
          body: new FormData(form),
          headers: { "X-CSRFToken": csrf, Accept: "text/event-stream" },
          credentials: "same-origin",
          signal: controller.signal,
        });
        if (!response.ok) {
          let message = `The playground answered ${response.status}.`;
          try {
            message = (await response.json()).error || message;
          } catch (ignored) {
            // not JSON (a proxy's page): the status says enough
          }
          output.hidden = true;
          fail(message);
          return;
        }
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value;
          let end;
          while ((end = buffer.indexOf("\n\n")) >= 0) {
            handle(buffer.slice(0, end));
            buffer = buffer.slice(end + 2);
          }
        }
      } catch (error) {
        if (error.name === "AbortError") {
          statsLine.textContent = "Stopped.";
          statsLine.hidden = false;
        } else {
          fail(`The answer broke off: ${error.message}`);
        }
      } finally {
        send.disabled = false;
        stop.hidden = true;
        controller = null;
      }
    }

    form.addEventListener("submit", (event) => {
      event.preventDefault();
      if (!controller) run();
    });
    stop.addEventListener("click", () => controller && controller.abort());
  }

  document.querySelectorAll("form[data-playground]").forEach(setup);
})();
