// The try-it page: pick a file or record from the microphone, POST it to /asr (JSON), show the
// transcript with segment times, and offer SRT and WebVTT built from the same segments, written as
// the service's own writers write them (app/formats.py; tests/test_pages.py compares the two).
"use strict";

const $ = (id) => document.getElementById(id);
let audio = null;          // the Blob to send: the picked file or the recording
let audioName = "audio";
let recorder = null;

function status(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function choose(blob, name) {
  audio = blob;
  audioName = name;
  $("transcribe").disabled = !audio;
  status(audio ? `${name}: ${(blob.size / 1024).toFixed(0)} kB, ready to transcribe` : "");
}

$("file").addEventListener("change", (e) => {
  const file = e.target.files[0];
  choose(file || null, file ? file.name : "");
});

$("record").addEventListener("click", async () => {
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (err) {
    status(`no microphone: ${err.message}`, true);
    return;
  }
  const type = ["audio/webm;codecs=opus", "audio/ogg;codecs=opus", "audio/webm"].find(
    (t) => MediaRecorder.isTypeSupported(t));
  recorder = new MediaRecorder(stream, type ? { mimeType: type } : {});
  const chunks = [];
  const started = Date.now();
  const timer = setInterval(() => { $("elapsed").textContent = ((Date.now() - started) / 1000).toFixed(0); }, 250);
  recorder.ondataavailable = (e) => { if (e.data.size) chunks.push(e.data); };
  recorder.onstop = () => {
    clearInterval(timer);
    stream.getTracks().forEach((t) => t.stop());
    $("recording").hidden = true;
    $("record").disabled = false;
    $("stop").disabled = true;
    const mime = recorder.mimeType || "audio/webm";
    choose(new Blob(chunks, { type: mime }), `recording.${mime.includes("ogg") ? "ogg" : "webm"}`);
  };
  recorder.start(1000);
  $("recording").hidden = false;
  $("record").disabled = true;
  $("stop").disabled = false;
  status("recording…");
});

$("stop").addEventListener("click", () => { if (recorder && recorder.state !== "inactive") recorder.stop(); });

$("transcribe").addEventListener("click", async () => {
  if (!audio) return;
  const form = new FormData();
  form.append("audio_file", audio, audioName);
  form.append("output", "json");
  form.append("task", $("task").value);
  if ($("language").value.trim()) form.append("language", $("language").value.trim());
  const headers = {};
  if ($("api-key").value.trim()) headers.Authorization = `Bearer ${$("api-key").value.trim()}`;
  $("transcribe").disabled = true;
  status("transcribing…");
  try {
    const response = await fetch("asr", { method: "POST", body: form, headers });
    const body = await response.json().catch(() => null);
    if (!response.ok) {
      const message = body && body.error ? `${body.error.code}: ${body.error.message}` : response.statusText;
      status(`${response.status} ${message}`, true);
      return;
    }
    show(body);
    status(`done in ${body.processing_time.toFixed(2)} s`);
  } catch (err) {
    status(`request failed: ${err.message}`, true);
  } finally {
    $("transcribe").disabled = false;
  }
});

function show(result) {
  $("result").hidden = false;
  $("transcript").textContent = result.text;
  $("meta").textContent = `${result.duration.toFixed(1)} s of audio · language ${result.language} · ` +
    `${result.model} on ${result.instance} (${result.device})`;
  const rows = $("segments").querySelector("tbody");
  rows.replaceChildren(...result.segments.map((s) => {
    const tr = document.createElement("tr");
    for (const [text, cls] of [[clock(s.start, "."), "time"], [clock(s.end, "."), "time"], [s.text.trim(), ""]]) {
      const td = document.createElement("td");
      td.textContent = text;
      if (cls) td.className = cls;
      tr.append(td);
    }
    return tr;
  }));
  link("download-srt", toSrt(result.segments), "application/x-subrip");
  link("download-vtt", toVtt(result.segments), "text/vtt");
}

function link(id, text, type) {
  const a = $(id);
  if (a.href) URL.revokeObjectURL(a.href);
  a.href = URL.createObjectURL(new Blob([text], { type }));
}

// HH:MM:SS,mmm (SRT) or HH:MM:SS.mmm (WebVTT), as app/formats.py's _clock.
function clock(seconds, marker) {
  let ms = Math.max(0, Math.round(seconds * 1000));
  const pad = (n, w) => String(n).padStart(w, "0");
  const h = Math.floor(ms / 3600000); ms -= h * 3600000;
  const m = Math.floor(ms / 60000); ms -= m * 60000;
  const s = Math.floor(ms / 1000); ms -= s * 1000;
  return `${pad(h, 2)}:${pad(m, 2)}:${pad(s, 2)}${marker}${pad(ms, 3)}`;
}

// Segments worth a cue: with text; "-->" in a cue would read as a timing line.
const cues = (segments) => segments.filter((s) => s.text.trim())
  .map((s) => ({ start: s.start, end: s.end, text: s.text.trim().replaceAll("-->", "->") }));

function toSrt(segments) {
  return cues(segments).map((c, i) => `${i + 1}\n${clock(c.start, ",")} --> ${clock(c.end, ",")}\n${c.text}\n`).join("\n");
}

function toVtt(segments) {
  return "WEBVTT\n\n" + cues(segments).map((c) => `${clock(c.start, ".")} --> ${clock(c.end, ".")}\n${c.text}\n`).join("\n");
}
