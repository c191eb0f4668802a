// The live captions' microphone tap (an AudioWorklet, run on the audio thread): the input mixed to mono
// and resampled from the AudioContext's rate to the rate the stream declares, then posted as 16-bit
// little-endian PCM, `chunk` seconds a message. The resampler is a windowed-sinc low-pass interpolator:
// going down from 48 kHz, whatever lies above the new Nyquist frequency is filtered out instead of
// folding back onto the speech.
"use strict";

const HALF_TAPS = 16;   // filter half-width, in output samples: enough for speech, cheap on one core

class PcmResampler extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const { rate, chunk } = options.processorOptions;
    this.step = sampleRate / rate;                 // input samples per output sample
    this.cutoff = Math.min(1, rate / sampleRate);  // of the input's Nyquist frequency
    this.reach = Math.ceil(HALF_TAPS / this.cutoff);  // input samples each side of an output one
    this.first = -this.reach;                      // input[0] is input sample `first`; primed with
    this.input = new Float32Array(this.reach);     // silence so the first output has a past
    this.at = 0;                                   // the next output's position, in input samples
    this.out = new Int16Array(Math.round(rate * chunk));
    this.filled = 0;
    this.running = true;
    this.port.onmessage = (e) => {
      if (e.data === "flush") {   // Stop: send what is left, then end
        this.post(this.filled);
        this.port.postMessage({ last: true });
        this.running = false;
      }
    };
  }

  process(inputs) {
    const channels = inputs[0];
    if (this.running && channels && channels.length) {
      const n = channels[0].length;
      const mono = new Float32Array(n);
      for (const channel of channels) {
        for (let i = 0; i < n; i++) mono[i] += channel[i] / channels.length;
      }
      this.feed(mono);
    }
    return this.running;
  }

  feed(samples) {
    const joined = new Float32Array(this.input.length + samples.length);
    joined.set(this.input);
    joined.set(samples, this.input.length);
    this.input = joined;
    const last = this.first + this.input.length - 1;   // the newest input sample
    while (this.at + this.reach <= last) {
      this.emit(this.sample(this.at));
      this.at += this.step;
    }
    const keep = Math.floor(this.at) - this.reach;      // the oldest sample a next output needs
    if (keep > this.first) {
      this.input = this.input.slice(keep - this.first);
      this.first = keep;
    }
  }

  // One output sample at input position t: sum of x[k] * cutoff * sinc(cutoff (t - k)) * Hann window.
  sample(t) {
    const from = Math.ceil(t - this.reach), to = Math.floor(t + this.reach);
    let sum = 0;
    for (let k = from; k <= to; k++) {
      const d = t - k;
      const x = this.cutoff * d;
      const sinc = x === 0 ? 1 : Math.sin(Math.PI * x) / (Math.PI * x);
      const window = 0.5 + 0.5 * Math.cos(Math.PI * d / this.reach);
      sum += this.input[k - this.first] * this.cutoff * sinc * window;
    }
    return sum;
  }

  emit(value) {
    this.out[this.filled++] = Math.max(-32768, Math.min(32767, Math.round(value * 32768)));
    if (this.filled === this.out.length) this.post(this.filled);
  }

  post(count) {
    if (!count) return;
    const bytes = new ArrayBuffer(count * 2);
    const view = new DataView(bytes);
    for (let i = 0; i < count; i++) view.setInt16(i * 2, this.out[i], true);
    this.port.postMessage({ pcm: bytes }, [bytes]);
    this.filled = 0;
  }
}

registerProcessor("pcm-resampler", PcmResampler);
