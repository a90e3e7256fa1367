//! AEAD throughput on 4 MiB chunks, the record size of ferry's packs, to pick the crate behind
//! `src/native/layout/crypt.rs`: ring, aws-lc-rs and RustCrypto, AES-256-GCM and
//! ChaCha20-Poly1305, and the `aegis` crate's AEGIS-256X2 and AEGIS-128L, sealing and opening
//! in place (what the compress and restore workers do).
//! Results: perf/results/crypto-aead.md (`cargo bench --bench crypto`).

#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const CHUNK: usize = 4 << 20;
const KEY: [u8; 32] = [7; 32];
const NONCE: [u8; 12] = [9; 12];
const AAD: &[u8] = &[1; 34];

/// Seal and open in place with the `LessSafeKey` API that ring and aws-lc-rs share (the same
/// code, two crates: a macro, as their types differ).
macro_rules! less_safe_pair {
    ($name:ident, $krate:ident) => {
        fn $name(
            algorithm: &'static $krate::aead::Algorithm,
        ) -> (impl FnMut(&mut Vec<u8>), impl FnMut(&mut Vec<u8>)) {
            use $krate::aead::{Aad, LessSafeKey, Nonce, UnboundKey};
            let seal = move |buf: &mut Vec<u8>| {
                let key = LessSafeKey::new(UnboundKey::new(algorithm, &KEY).unwrap());
                let tag = key
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key(NONCE),
                        Aad::from(AAD),
                        buf.as_mut_slice(),
                    )
                    .unwrap();
                buf.extend_from_slice(tag.as_ref());
            };
            let open = move |buf: &mut Vec<u8>| {
                let key = LessSafeKey::new(UnboundKey::new(algorithm, &KEY).unwrap());
                let plain = key
                    .open_in_place(
                        Nonce::assume_unique_for_key(NONCE),
                        Aad::from(AAD),
                        buf.as_mut_slice(),
                    )
                    .unwrap();
                let len = plain.len();
                buf.truncate(len);
            };
            (seal, open)
        }
    };
}

less_safe_pair!(ring_pair, ring);
less_safe_pair!(aws_pair, aws_lc_rs);

fn rustcrypto_pair<C: aes_gcm::aead::AeadInPlace + aes_gcm::KeyInit>()
-> (impl FnMut(&mut Vec<u8>), impl FnMut(&mut Vec<u8>)) {
    let seal = |buf: &mut Vec<u8>| {
        let cipher = C::new_from_slice(&KEY).unwrap();
        cipher.encrypt_in_place(NONCE.as_slice().into(), AAD, buf).unwrap();
    };
    let open = |buf: &mut Vec<u8>| {
        let cipher = C::new_from_slice(&KEY).unwrap();
        cipher.decrypt_in_place(NONCE.as_slice().into(), AAD, buf).unwrap();
    };
    (seal, open)
}

/// AEGIS with the `aegis` crate's in-place API (`$aegis`: the type, `$key`/`$nonce`: sizes).
macro_rules! aegis_pair {
    ($name:ident, $aegis:ty, $key:expr, $nonce:expr) => {
        fn $name() -> (impl FnMut(&mut Vec<u8>), impl FnMut(&mut Vec<u8>)) {
            let (key, nonce) = ([7u8; $key], [9u8; $nonce]);
            let seal = move |buf: &mut Vec<u8>| {
                let tag = <$aegis>::new(&key, &nonce).encrypt_in_place(buf.as_mut_slice(), AAD);
                buf.extend_from_slice(&tag);
            };
            let open = move |buf: &mut Vec<u8>| {
                let split = buf.len() - 16;
                let tag: [u8; 16] = buf[split..].try_into().unwrap();
                buf.truncate(split);
                <$aegis>::new(&key, &nonce)
                    .decrypt_in_place(buf.as_mut_slice(), &tag, AAD)
                    .unwrap();
            };
            (seal, open)
        }
    };
}

aegis_pair!(aegis256x2_pair, aegis::aegis256x2::Aegis256X2<16>, 32, 32);
aegis_pair!(aegis128l_pair, aegis::aegis128l::Aegis128L<16>, 16, 16);

fn bench_pair(
    c: &mut Criterion,
    name: &str,
    (mut seal, mut open): (impl FnMut(&mut Vec<u8>), impl FnMut(&mut Vec<u8>)),
) {
    let mut group = c.benchmark_group(name);
    let _ = group.throughput(Throughput::Bytes(CHUNK as u64)).sample_size(20);
    let mut buf = vec![0x5au8; CHUNK];
    let _ = group.bench_function("seal", |b| {
        b.iter(|| {
            buf.truncate(CHUNK);
            seal(black_box(&mut buf));
        });
    });
    seal(&mut buf);
    let sealed = buf.clone();
    let _ = group.bench_function("open", |b| {
        b.iter(|| {
            buf.clear();
            buf.extend_from_slice(&sealed);
            open(black_box(&mut buf));
        });
    });
    group.finish();
}

fn aeads(c: &mut Criterion) {
    bench_pair(c, "aegis/aegis-256x2", aegis256x2_pair());
    bench_pair(c, "aegis/aegis-128l", aegis128l_pair());
    bench_pair(c, "ring/aes-256-gcm", ring_pair(&ring::aead::AES_256_GCM));
    bench_pair(c, "ring/chacha20-poly1305", ring_pair(&ring::aead::CHACHA20_POLY1305));
    bench_pair(c, "aws-lc-rs/aes-256-gcm", aws_pair(&aws_lc_rs::aead::AES_256_GCM));
    bench_pair(c, "aws-lc-rs/chacha20-poly1305", aws_pair(&aws_lc_rs::aead::CHACHA20_POLY1305));
    bench_pair(c, "rustcrypto/aes-256-gcm", rustcrypto_pair::<aes_gcm::Aes256Gcm>());
    bench_pair(
        c,
        "rustcrypto/chacha20-poly1305",
        rustcrypto_pair::<chacha20poly1305::ChaCha20Poly1305>(),
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(3));
    targets = aeads
}
criterion_main!(benches);
