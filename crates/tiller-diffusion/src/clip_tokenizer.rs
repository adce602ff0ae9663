//! CLIP's byte-level BPE tokenizer (Radford et al. 2021) through Hugging Face's `tokenizers`
//! crate, read from a pipeline's `tokenizer/` folder, encoding prompts as diffusers' Stable
//! Diffusion pipelines do: `tokenizer(prompt, padding="max_length",
//! max_length=tokenizer.model_max_length, truncation=True)`.
//!
//! A folder holds `tokenizer_config.json` (`model_max_length`, the special tokens) and either
//! `tokenizer.json` (what transformers' fast tokenizers save) or CLIP's `vocab.json` +
//! `merges.txt` (what SD 1.x/2.x folders ship). From the latter the tokenizer is built as
//! transformers 5's `CLIPTokenizer` builds it: NFC, runs of whitespace to one space, lowercase;
//! CLIP's split pattern, then GPT-2's byte-to-unicode mapping; BPE with the `</w>` end-of-word
//! suffix; `<|startoftext|>` and `<|endoftext|>` around the tokens. Padding uses the folder's
//! `pad_token` (`<|endoftext|>` in SD 1.x, `!` in SD 2.x and SDXL's `tokenizer_2`).
//!
//! Truncation cuts the prompt's tokens so that bos, the kept tokens and eos fill
//! `model_max_length`, as transformers does; [`TokenizedPrompt::dropped`] says how many were cut,
//! where diffusers logs a warning.

use serde_json::Value;
use std::path::Path;
use tiller_core::{Error, Result};
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{
    AddedToken, PaddingDirection, PaddingParams, PaddingStrategy, SplitDelimiterBehavior,
    Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};

/// CLIP's pre-tokenization pattern as transformers 5 writes it: the special tokens, English
/// contractions, runs of letters, single digits, runs of other non-space characters.
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A prompt's token ids, `model_max_length` of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedPrompt {
    pub ids: Vec<u32>,
    /// Tokens of the prompt cut by truncation (0 when it fit).
    pub dropped: usize,
}

/// A CLIP tokenizer folder, ready to encode prompts.
#[derive(Debug, Clone)]
pub struct ClipTokenizer {
    /// Truncates and pads to `max_length`.
    fixed: Tokenizer,
    /// The same without truncation or padding, to count what truncation drops.
    open: Tokenizer,
    max_length: usize,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
}

/// The special tokens and length a `tokenizer_config.json` (and `special_tokens_map.json`) name.
struct Specials {
    bos: String,
    eos: String,
    unk: String,
    pad: String,
    max_length: usize,
}

impl ClipTokenizer {
    /// Reads a tokenizer folder (see the module documentation). Errors name the file and field.
    pub fn from_folder(folder: &Path) -> Result<Self> {
        let specials = read_specials(folder)?;
        let json = folder.join("tokenizer.json");
        let mut tokenizer = if json.exists() {
            Tokenizer::from_file(&json).map_err(|e| Error::format(&json, e.to_string()))?
        } else {
            build_from_vocab_and_merges(folder, &specials)?
        };
        let id = |token: &str, field: &str| {
            tokenizer.token_to_id(token).ok_or_else(|| {
                Error::format(
                    folder.join("tokenizer_config.json"),
                    format!("`{field}` {token:?} is not in the vocabulary"),
                )
            })
        };
        let (bos_id, eos_id, pad_id) = (
            id(&specials.bos, "bos_token")?,
            id(&specials.eos, "eos_token")?,
            id(&specials.pad, "pad_token")?,
        );
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::invalid(e.to_string()))?;
        let open = tokenizer.clone();
        tokenizer
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: specials.max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| Error::invalid(e.to_string()))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(specials.max_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token: specials.pad.clone(),
        }));
        Ok(Self {
            fixed: tokenizer,
            open,
            max_length: specials.max_length,
            bos_id,
            eos_id,
            pad_id,
        })
    }

    /// `[bos, tokens..., eos, pad...]`, `max_length` ids, the tokens truncated to fit.
    pub fn encode(&self, text: &str) -> Result<TokenizedPrompt> {
        let fail = |e: tokenizers::Error| Error::invalid(format!("tokenizing {text:?}: {e}"));
        let ids = self
            .fixed
            .encode(text, true)
            .map_err(fail)?
            .get_ids()
            .to_vec();
        let full = self.open.encode(text, true).map_err(fail)?.len();
        Ok(TokenizedPrompt {
            ids,
            dropped: full.saturating_sub(self.max_length),
        })
    }

    /// The ids of each prompt as the text encoder takes them ([`Self::encode`]'s, widened).
    pub fn encode_ids<S: AsRef<str>>(&self, prompts: &[S]) -> Result<Vec<Vec<i64>>> {
        prompts
            .iter()
            .map(|p| {
                Ok(self
                    .encode(p.as_ref())?
                    .ids
                    .into_iter()
                    .map(i64::from)
                    .collect())
            })
            .collect()
    }

    /// Length of every encoding (`model_max_length`).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.fixed.get_vocab_size(true)
    }
}

/// A token in `tokenizer_config.json`: a string, or an `AddedToken` object with `content`.
fn token_field(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(String::from),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::format(path, e.to_string()))
}

fn read_specials(folder: &Path) -> Result<Specials> {
    let config_path = folder.join("tokenizer_config.json");
    let config = read_json(&config_path)?;
    let map_path = folder.join("special_tokens_map.json");
    let map = if map_path.exists() {
        Some(read_json(&map_path)?)
    } else {
        None
    };
    // transformers' CLIPTokenizer defaults, where neither file names a token.
    let token = |field: &str, default: &str| -> Result<String> {
        match config.get(field) {
            Some(Value::Null) | None => {}
            Some(v) => {
                return token_field(Some(v)).ok_or_else(|| {
                    Error::format(
                        &config_path,
                        format!("`{field}` must be a string or an object with `content`"),
                    )
                });
            }
        }
        Ok(map
            .as_ref()
            .and_then(|m| token_field(m.get(field)))
            .unwrap_or_else(|| default.to_string()))
    };
    let max_length = match config.get("model_max_length") {
        Some(Value::Number(n)) => n.as_u64().filter(|&n| (3..=1 << 20).contains(&n)),
        _ => None,
    }
    .ok_or_else(|| {
        Error::format(
            &config_path,
            format!(
                "`model_max_length` must be the text encoder's sequence length (77 for CLIP), \
                 found {}",
                config
                    .get("model_max_length")
                    .map_or("nothing".to_string(), Value::to_string)
            ),
        )
    })? as usize;
    Ok(Specials {
        bos: token("bos_token", "<|startoftext|>")?,
        eos: token("eos_token", "<|endoftext|>")?,
        unk: token("unk_token", "<|endoftext|>")?,
        pad: token("pad_token", "<|endoftext|>")?,
        max_length,
    })
}

/// transformers 5's `CLIPTokenizer` from `vocab.json` and `merges.txt`.
fn build_from_vocab_and_merges(folder: &Path, specials: &Specials) -> Result<Tokenizer> {
    let vocab_path = folder.join("vocab.json");
    let merges_path = folder.join("merges.txt");
    if !vocab_path.exists() {
        return Err(Error::format(
            folder,
            "no tokenizer.json, and no vocab.json + merges.txt: not a tokenizer folder",
        ));
    }
    let vocab: Vocab = match read_json(&vocab_path)? {
        Value::Object(map) => map
            .into_iter()
            .map(|(token, id)| match id.as_u64() {
                Some(id) if id <= u32::MAX as u64 => Ok((token, id as u32)),
                _ => Err(Error::format(
                    &vocab_path,
                    format!("token {token:?} has id {id}, not a non-negative integer"),
                )),
            })
            .collect::<Result<_>>()?,
        _ => {
            return Err(Error::format(
                &vocab_path,
                "expected an object of token -> id",
            ));
        }
    };
    let text = std::fs::read_to_string(&merges_path).map_err(|e| Error::io(&merges_path, e))?;
    let mut merges = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if (n == 0 && line.starts_with("#version")) || line.trim().is_empty() {
            continue;
        }
        match line.split(' ').collect::<Vec<_>>()[..] {
            [a, b] => merges.push((a.to_string(), b.to_string())),
            _ => {
                return Err(Error::format(
                    &merges_path,
                    format!("line {}: expected two tokens separated by one space", n + 1),
                ));
            }
        }
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix("</w>".into())
        .fuse_unk(false)
        .unk_token(specials.unk.clone())
        .build()
        .map_err(|e| Error::format(&merges_path, e.to_string()))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let regex = |p: &str| -> Result<Replace> {
        Replace::new(
            tokenizers::normalizers::replace::ReplacePattern::Regex(p.into()),
            " ",
        )
        .map_err(|e| Error::invalid(e.to_string()))
    };
    tokenizer
        .with_normalizer(Some(NormalizerSequence::new(vec![
            NFC.into(),
            regex(r"\s+")?.into(),
            Lowercase.into(),
        ])))
        .map_err(|e| Error::invalid(e.to_string()))?;
    let split = Split::new(
        SplitPattern::Regex(CLIP_PATTERN.into()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(|e| Error::invalid(e.to_string()))?;
    tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
        split.into(),
        ByteLevel::new(false, true, true).into(),
    ])));
    tokenizer.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
    let id = |token: &str, field: &str| -> Result<u32> {
        tokenizer.token_to_id(token).ok_or_else(|| {
            Error::format(
                &vocab_path,
                format!("`{field}` {token:?} (tokenizer_config.json) is not in the vocabulary"),
            )
        })
    };
    // A special token outside vocab.json would get an id past the text encoder's embedding
    // table (transformers appends it); refuse it here.
    for (token, field) in [(&specials.unk, "unk_token"), (&specials.pad, "pad_token")] {
        id(token, field)?;
    }
    let processor = RobertaProcessing::new(
        (specials.eos.clone(), id(&specials.eos, "eos_token")?),
        (specials.bos.clone(), id(&specials.bos, "bos_token")?),
    )
    .trim_offsets(false)
    .add_prefix_space(false);
    tokenizer.with_post_processor(Some(processor));
    let mut added: Vec<&String> = Vec::new();
    for t in [&specials.bos, &specials.eos, &specials.unk, &specials.pad] {
        if !added.contains(&t) {
            added.push(t);
        }
    }
    tokenizer
        .add_special_tokens(added.into_iter().map(|t| AddedToken::from(t.clone(), true)))
        .map_err(|e| Error::invalid(e.to_string()))?;
    Ok(tokenizer)
}
