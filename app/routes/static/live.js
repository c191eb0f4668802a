// Live captions: the microphone streamed to /v1/realtime?intent=transcription in OpenAI's Realtime
// transcription protocol (16-bit PCM at 24 kHz in input_audio_buffer.append; the server's VAD cuts
// turns). A turn's deltas show as they settle (provisional), its completed transcript replaces them
// (final). Stop sends what the microphone still held, commits an open turn, waits for the last
// transcripts and closes the socket with 1000. Uses page.js's $ and the same API key field.
"use strict";

const LIVE_RATE = 24000;                          // the protocol's audio/pcm rate
const KEY_SUBPROTOCOL = "openai-insecure-api-key.";  // how a browser's WebSocket carries an API key
const SEND_SECONDS = 0.1;                         // audio in one append, as a microphone sends it
const STOP_WAIT_MS = 15000;                       // how long Stop waits for the last turns' transcripts

let live = null;   // the running stream: {socket, context, microphone, node, lines, open, pending, ...}

function liveState(text) {
  $("live-state").textContent = text;
}

function liveError(text) {
  $("live-error").textContent = text;
  $("live-error").hidden = !text;
}

function liveButtons(running) {
  $("live").disabled = running;
  $("live-stop").disabled = !running;
}

function realtimeUrl() {
  const url = new URL("v1/realtime?intent=transcription", document.baseURI);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url.href;
}

$("live").addEventListener("click", () => {
  if (live) return;
  liveError("");
  if (!window.AudioWorkletNode || !navigator.mediaDevices) {
    liveError("live captions need the microphone and an AudioWorklet: open the page over https or on localhost");
    return;
  }
  const key = $("api-key").value.trim();
  const protocols = key ? ["realtime", KEY_SUBPROTOCOL + key] : ["realtime"];
  let socket;
  try {
    socket = new WebSocket(realtimeUrl(), protocols);
  } catch (err) {
    liveError(`cannot open the live stream: ${err.message}` +
      (key ? " (a browser's WebSocket cannot carry an API key holding / or =)" : ""));
    return;
  }
  // Made here, in the click, so the browser lets it play; the microphone joins once the session is up.
  const context = new AudioContext();
  const stream = live = { socket, context, key, opened: false, stopping: false, error: "", lines: new Map(),
                          open: null, pending: new Set(), microphone: null, node: null };
  $("captions").hidden = false;
  liveButtons(true);
  liveState("connecting…");
  socket.onopen = () => { stream.opened = true; };
  socket.onmessage = (e) => onEvent(stream, JSON.parse(e.data));
  socket.onclose = (e) => onClose(stream, e);
});

$("live-stop").addEventListener("click", () => stopLive());

function onEvent(stream, event) {
  switch (event.type) {
    case "session.created": {
      const language = $("language").value.trim();
      send(stream, { type: "session.update", session: { type: "transcription", audio: { input: {
        format: { type: "audio/pcm", rate: LIVE_RATE },
        transcription: language ? { language } : {} } } } });
      startMicrophone(stream);
      break;
    }
    case "input_audio_buffer.speech_started":
      stream.open = event.item_id;
      line(stream, event.item_id);
      break;
    case "input_audio_buffer.committed":
      if (stream.open === event.item_id) stream.open = null;
      stream.pending.add(event.item_id);
      break;
    case "conversation.item.input_audio_transcription.delta":
      line(stream, event.item_id).textContent += event.delta;
      break;
    case "conversation.item.input_audio_transcription.completed": {
      const p = line(stream, event.item_id);
      p.textContent = event.transcript;
      p.className = "final";
      if (!event.transcript) p.remove();
      settled(stream, event.item_id);
      break;
    }
    case "conversation.item.input_audio_transcription.failed":
      line(stream, event.item_id).className = "failed";
      liveError(`a turn was not transcribed: ${event.error.message}`);
      settled(stream, event.item_id);
      break;
    case "error":
      if (stream.stopping && event.error.code === "input_audio_buffer_commit_empty") {   // the turn had just ended
        stream.open = null;
        settled(stream, null);
        break;
      }
      stream.error = `${event.error.code}: ${event.error.message}`;
      liveError(stream.error);
      break;
  }
}

// The caption line of a turn: provisional (its deltas) until its transcript comes.
function line(stream, itemId) {
  let p = stream.lines.get(itemId);
  if (!p) {
    p = document.createElement("p");
    p.className = "provisional";
    p.dataset.item = itemId;
    $("caption-lines").append(p);
    stream.lines.set(itemId, p);
  }
  return p;
}

function settled(stream, itemId) {
  stream.pending.delete(itemId);
  if (stream.stopping && !stream.open && !stream.pending.size) stream.socket.close(1000, "stopped");
}

function send(stream, event) {
  if (stream.socket.readyState === WebSocket.OPEN) stream.socket.send(JSON.stringify(event));
}

async function startMicrophone(stream) {
  try {
    await stream.context.audioWorklet.addModule("static/live-worklet.js");
    const microphone = await navigator.mediaDevices.getUserMedia({ audio: true });
    if (live !== stream || stream.stopping) {   // stopped or closed meanwhile
      microphone.getTracks().forEach((t) => t.stop());
      return;
    }
    stream.microphone = microphone;
    stream.node = new AudioWorkletNode(stream.context, "pcm-resampler", {
      numberOfOutputs: 0, processorOptions: { rate: LIVE_RATE, chunk: SEND_SECONDS } });
    stream.node.port.onmessage = (e) => {
      if (e.data.pcm) send(stream, { type: "input_audio_buffer.append", audio: base64(e.data.pcm) });
      if (e.data.last && stream.onFlushed) stream.onFlushed();
    };
    stream.context.createMediaStreamSource(microphone).connect(stream.node);
    await stream.context.resume();
    liveState(`listening (${stream.context.sampleRate} Hz microphone → ${LIVE_RATE} Hz)`);
  } catch (err) {
    liveError(`no microphone: ${err.message}`);
    stream.stopping = true;
    stream.socket.close(1000, "no microphone");
  }
}

function base64(buffer) {
  const bytes = new Uint8Array(buffer);
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

// Stop: the microphone's last samples go out, an open turn is committed, and the socket closes once
// every committed turn has its transcript (or STOP_WAIT_MS passed).
async function stopLive() {
  const stream = live;
  if (!stream || stream.stopping) return;
  stream.stopping = true;
  $("live-stop").disabled = true;
  liveState("stopping: waiting for the last transcripts…");
  if (stream.node) {
    await new Promise((resolve) => {
      stream.onFlushed = resolve;
      stream.node.port.postMessage("flush");
      setTimeout(resolve, 1000);
    });
  }
  releaseMicrophone(stream);
  if (stream.open) send(stream, { type: "input_audio_buffer.commit" });
  if (!stream.open && !stream.pending.size) {
    stream.socket.close(1000, "stopped");
    return;
  }
  setTimeout(() => { if (live === stream) stream.socket.close(1000, "stopped"); }, STOP_WAIT_MS);
}

function releaseMicrophone(stream) {
  if (stream.microphone) stream.microphone.getTracks().forEach((t) => t.stop());
  stream.microphone = null;
  if (stream.context.state !== "closed") stream.context.close();
}

async function onClose(stream, e) {
  live = null;
  releaseMicrophone(stream);
  liveButtons(false);
  for (const p of stream.lines.values()) {
    if (p.className === "provisional") p.className = "cut";   // its transcript never came
  }
  if (stream.stopping && (e.code === 1000 || !stream.opened)) {
    liveState("stopped");
  } else if (!stream.opened) {
    liveState("");
    liveError(await refusal(stream.key));
  } else {
    liveState("");
    const how = `the live stream was closed (${e.code}${e.reason ? " " + e.reason : ""})`;
    liveError(stream.error ? `${how}: ${stream.error}` : how);
  }
}

// A browser tells nothing of why a WebSocket handshake failed: a plain GET of the same URL, with the
// same key, gets the server's reason (401, 503 streams_full, ...); 426 means a stream could open now.
async function refusal(key) {
  const url = new URL("v1/realtime?intent=transcription", document.baseURI);
  try {
    const response = await fetch(url, { headers: key ? { Authorization: `Bearer ${key}` } : {} });
    const body = await response.json().catch(() => null);
    const reason = body && body.error ? `${body.error.code}: ${body.error.message}` : response.statusText;
    if (response.status === 426) return "the live stream was refused, though the server would take one now: try again";
    return `the live stream was refused: ${response.status} ${reason}`;
  } catch (err) {
    return `the live stream was refused and the server cannot be reached: ${err.message}`;
  }
}
