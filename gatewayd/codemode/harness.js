// The per-run harness of a Code Mode sandbox, evaluated first in each fresh V8 context.
// It captures the intrinsics it needs before any program runs, so a program that tampers with
// JSON, Promise or Object.prototype breaks only itself; host-side checks never trust it.
// It evaluates to a function that the worker calls once, with the host notification function
// and the limits, when it prepares the context. That defines two globals the worker evaluates:
// __codemode_start(toolNames, source), once, which reports how the program ended with
// a "done" notification, and __codemode_settle(id, ok, text), which answers a tool call.
// A notification is one string: "send\n" + a wire message for the host (a tool call, a log
// line), or "done\n" + the outcome ("ok:<json>", "error:<message>", "limit-<kind>:<message>").
// A program can see and call them; that only lets it lie to itself.
(function (notify, maxLogChars, maxLogLines, maxResultChars, maxInputChars) {
  "use strict";
  const stringify = JSON.stringify;
  const parse = JSON.parse;
  const freeze = Object.freeze;
  const defineProperty = Object.defineProperty;
  const create = Object.create;
  const hasOwn = Object.hasOwn;
  const PromiseCtor = Promise;
  const promiseThen = Promise.prototype.then;
  const apply = Reflect.apply;
  const ErrorCtor = Error;
  const TypeErrorCtor = TypeError;
  const StringCtor = String;
  const AsyncFunction = (async function () {}).constructor;
  const indirectEval = eval;

  const pending = create(null);
  let nextCallId = 0;
  let logChars = 0;
  let logLines = 0;
  let logsCut = false;

  // `message` has no prototype: a program's Object.prototype.toJSON cannot rewrite it.
  function send(message) {
    notify("send\n" + stringify(message));
  }

  function formatArg(value) {
    if (typeof value === "string") return value;
    try {
      const text = stringify(value);
      return text === undefined ? StringCtor(value) : text;
    } catch (e) {
      return StringCtor(value);
    }
  }

  function logger(level) {
    return function (...args) {
      if (logsCut) return;
      let text = "";
      for (let i = 0; i < args.length; i++) text += (i ? " " : "") + formatArg(args[i]);
      if (logLines + 1 > maxLogLines || logChars + text.length > maxLogChars) {
        logsCut = true;
        send({ __proto__: null, type: "log", level: "warn", text: "[further logs dropped: the limit is " +
          maxLogLines + " lines or " + maxLogChars + " characters]" });
        return;
      }
      logLines += 1;
      logChars += text.length;
      send({ __proto__: null, type: "log", level: level, text: text });
    };
  }

  const consoleObject = freeze({
    log: logger("log"), info: logger("info"), warn: logger("warn"),
    error: logger("error"), debug: logger("debug"),
  });
  defineProperty(globalThis, "console", { value: consoleObject, writable: false, configurable: false });

  function callTool(name, input) {
    let text;
    try {
      text = stringify(input === undefined ? {} : input);
    } catch (e) {
      return PromiseCtor.reject(new TypeErrorCtor(
        "codemode." + name + "(input): the input cannot be turned into JSON: " + e.message));
    }
    if (typeof text !== "string") {
      return PromiseCtor.reject(new TypeErrorCtor(
        "codemode." + name + "(input): the input must be a JSON object"));
    }
    if (text.length > maxInputChars) {
      return PromiseCtor.reject(new RangeError(
        "codemode." + name + "(input): the input is " + text.length +
        " characters of JSON, over the limit of " + maxInputChars));
    }
    return new PromiseCtor(function (resolve, reject) {
      const id = nextCallId++;
      pending[id] = [resolve, reject];
      send({ __proto__: null, type: "call", id: id, tool: name, input: text });
    });
  }

  function settle(id, ok, text) {
    const entry = pending[id];
    if (entry === undefined) return;
    delete pending[id];
    if (ok) {
      entry[0](text === "" ? undefined : parse(text));
    } else {
      const error = new ErrorCtor(text);
      error.name = "ToolError";
      entry[1](error);
    }
  }

  const split = String.prototype.split;
  const exec = RegExp.prototype.exec;
  const programFrame = /^\s*at (.*?) ?\(?eval at compile \(.*\), <anonymous>:(\d+):(\d+)\)$/;
  let lineOffset = 0; // lines the compiled wrapper adds before the program's first line

  // "Name: message" and the program's own frames ("at f (line 3:14)"), without the harness's.
  function describe(e) {
    try {
      if (!(e instanceof ErrorCtor)) return "Uncaught " + formatArg(e);
      let text = StringCtor(e.name) + ": " + StringCtor(e.message);
      if (e.name === "ToolError" || typeof e.stack !== "string") return text;
      const lines = apply(split, e.stack, ["\n"]);
      let previous = "";
      let repeats = 0;
      for (let i = 1; i < lines.length && i < 12; i++) {
        const match = apply(exec, programFrame, [lines[i]]);
        if (match === null) continue;
        const where = "line " + (match[2] - lineOffset) + ":" + match[3];
        const frame = "\n    at " + (match[1] === "eval" ? where : match[1] + " (" + where + ")");
        if (frame === previous) {
          repeats += 1;
          continue;
        }
        if (repeats) text += " (and " + repeats + " more times)";
        text += frame;
        previous = frame;
        repeats = 0;
      }
      if (repeats) text += " (and " + repeats + " more times)";
      return text;
    } catch (inner) {
      return "an error that cannot be described";
    }
  }

  function compile(source) {
    // `async () => { ... }` (the documented form) is called; anything else is a function body.
    if (/^\s*(\(\s*)?async\b/.test(source)) {
      let candidate;
      try {
        candidate = indirectEval("(" + source + "\n)");
      } catch (e) {
        candidate = undefined;
      }
      if (typeof candidate === "function") return candidate;
    }
    lineOffset = 2; // "(async function anonymous(\n) {\n"
    return new AsyncFunction(source);
  }

  function bindTools(jsNames) {
    const api = create(null);
    for (const name of jsNames) {
      const fn = function (input) { return callTool(name, input); };
      defineProperty(fn, "name", { value: name });
      api[name] = freeze(fn);
    }
    freeze(api);
    const known = jsNames.join(", ") || "none";
    const codemode = new Proxy(api, {
      get(target, key) {
        if (typeof key !== "string" || key === "then" || hasOwn(target, key)) return target[key];
        throw new TypeErrorCtor("codemode." + key + " is not a tool here; the tools are: " + known);
      },
      set() { return false; },
      defineProperty() { return false; },
      deleteProperty() { return false; },
      setPrototypeOf() { return false; },
    });
    defineProperty(globalThis, "codemode", { value: codemode, writable: false, configurable: false });
  }

  let started = false;

  async function run(source) {
    let value;
    try {
      value = await compile(source)();
    } catch (e) {
      return "error:" + describe(e);
    }
    let text;
    try {
      text = value === undefined ? "" : stringify(value);
    } catch (e) {
      return "error:TypeError: the program's return value cannot be turned into JSON: " + e.message;
    }
    if (typeof text !== "string") text = "";
    if (text.length > maxResultChars) {
      return "limit-result:the program's return value is " + text.length +
        " characters of JSON, over the limit of " + maxResultChars;
    }
    return "ok:" + text;
  }

  function start(jsNames, source) {
    if (started) return;
    started = true;
    bindTools(jsNames);
    apply(promiseThen, run(source), [
      function (outcome) { notify("done\n" + outcome); },
      function (e) { notify("done\n" + "error:" + describe(e)); },
    ]);
  }

  // mini-racer's setTimeout fails for a delay of 0 (Atomics.waitAsync answers at once).
  const innerSetTimeout = setTimeout;
  const max = Math.max;
  globalThis.setTimeout = function (callback, delay, ...args) {
    return innerSetTimeout(callback, max(1, +delay || 0), ...args);
  };

  // The host notification (mini-racer's wrapper) uses Promise.withResolvers at each call: a
  // program that could replace it would cut its own line to the host and hang until killed.
  freeze(PromiseCtor);
  freeze(PromiseCtor.prototype);

  const fixed = { writable: false, enumerable: false, configurable: false };
  defineProperty(globalThis, "__codemode_start", { value: start, ...fixed });
  defineProperty(globalThis, "__codemode_settle", { value: settle, ...fixed });
})
