// Each module registers its commands; add a line here for a new group.
import "./directory.ts";
import "./dkim.ts";
import "./token.ts";
import "./mailbox.ts";
import "./filter.ts";
import "./queue.ts";
import "./journey.ts";
import "./dns.ts";
