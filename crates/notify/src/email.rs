//! Email over SMTP (lettre): STARTTLS, implicit TLS, or plain to a relay on
//! this host; AUTH with a password read from a file.

use std::path::Path;

use backstop_config::{EmailConfig, SmtpTls};
use lettre::message::header::ContentType;
use lettre::message::{Mailbox, Message};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};

use crate::{Event, SendError, email_subject, text_body};

fn mailbox(s: &str) -> Result<Mailbox, SendError> {
    s.parse()
        .map_err(|e| SendError::permanent(format!("invalid address {s:?}: {e}")))
}

/// The message: plain text, with headers a mail filter can route on.
pub(crate) fn message(cfg: &EmailConfig, event: &Event) -> Result<Message, SendError> {
    let mut b = Message::builder()
        .from(mailbox(&cfg.from)?)
        .subject(email_subject(event))
        .message_id(Some(format!("<{}@{}>", event.delivery_id, event.host)))
        .header(ContentType::TEXT_PLAIN);
    for to in &cfg.to {
        b = b.to(mailbox(to)?);
    }
    b.body(text_body(event))
        .map_err(|e| SendError::permanent(format!("cannot build the message: {e}")))
}

pub(crate) async fn send(
    cfg: &EmailConfig,
    ca_file: Option<&Path>,
    event: &Event,
) -> Result<(), SendError> {
    let tls = if cfg.tls == SmtpTls::None {
        Tls::None
    } else {
        let mut params = TlsParameters::builder(cfg.host.clone());
        if let Some(path) = ca_file {
            let pem = crate::read_pem(path)?;
            let cert = Certificate::from_pem(&pem)
                .map_err(|e| SendError::permanent(format!("ca_file {}: {e}", path.display())))?;
            params = params.add_root_certificate(cert);
        }
        let params = params
            .build_rustls()
            .map_err(|e| SendError::permanent(format!("TLS setup: {e}")))?;
        match cfg.tls {
            SmtpTls::Tls => Tls::Wrapper(params),
            _ => Tls::Required(params),
        }
    };
    let mut transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&cfg.host)
        .port(cfg.port)
        .tls(tls)
        .hello_name(ClientId::Domain(event.host.clone()))
        // The caller's timeout bounds the whole attempt; this one each read.
        .timeout(None);
    if let (Some(user), Some(password)) = (&cfg.username, &cfg.password) {
        transport = transport.credentials(Credentials::new(
            user.clone(),
            password.expose().to_string(),
        ));
    }
    let message = message(cfg, event)?;
    match transport.build().send(message).await {
        Ok(_) => Ok(()),
        Err(e) => {
            // A 5xx answer (bad recipient, auth refused) will not change on
            // retry; a 4xx or a dropped connection may.
            // A refused certificate is refused again on every attempt.
            let retryable = !e.is_permanent()
                && !e.is_client()
                && !crate::is_certificate_error(&e)
                && !crate::filter_explains(&e).is_some_and(|x| x.certain);
            Err(SendError {
                message: crate::delivery_reason(&e, false),
                retryable,
                retry_after: None,
            })
        }
    }
}
