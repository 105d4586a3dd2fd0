// The per-run harness of a Code Mode sandbox, evaluated first in each fresh V8 context.
// It captures the intrinsics it needs before any program runs, so a program that tampers with
// JSON, Promise or Object.prototype breaks only itself; host-side checks never trust it.
// It evaluates to a function that the worker calls once with the host notification function
// and the run's settings, and which returns [start, settle].
(function (notify, jsNames, maxLogChars, maxLogLines, maxResultChars) {
  "use strict";
  const stringify = JSON.stringify;
  const parse = JSON.parse;
  const freeze = Object.freeze;
  const defineProperty = Object.defineProperty;
  const create = Object.create;
  const hasOwn = Object.hasOwn;
  const PromiseCtor = Promise;
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
        notify("log", "warn", "[further logs dropped: the limit is " + maxLogLines +
          " lines or " + maxLogChars + " characters]");
        return;
      }
      logLines += 1;
      logChars += text.length;
      notify("log", level, text);
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
    return new PromiseCtor(function (resolve, reject) {
      const id = nextCallId++;
      pending[id] = [resolve, reject];
      notify("call", id, name, text);
    });
  }

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

  function describe(e) {
    try {
      if (e instanceof ErrorCtor) {
        const stack = typeof e.stack === "string" ? e.stack : "";
        return stack || (StringCtor(e.name) + ": " + StringCtor(e.message));
      }
      return "Uncaught " + formatArg(e);
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
    return new AsyncFunction(source);
  }

  async function start(source) {
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

  return [start, settle];
})
